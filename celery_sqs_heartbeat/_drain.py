"""The shutdown's drain: the messages a stopping worker will not run go back at once.

It owns two worker bootsteps, added at ``worker_init``: :class:`Drain`, whose ``close``
hands back each waiting message Celery would not run (one batched call per queue), and
:class:`StopBeats`, which ends every heartbeat but those of running tasks just before
kombu releases what is unacknowledged. What it takes in each pool and series, and why
then: ``docs/deploying.md`` (warm shutdown). The reads of Celery's queues are
``_celery``'s; the hand-back is the beats' (``_beats.Beats``). A failed hand-back is
logged once and never raised: that message comes back when its visibility runs out.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

from . import _celery, _process
from ._beats import Beats
from ._errors import Failure, describe_denied
from ._guard import Guard
from ._heartbeat import Ended

logger = logging.getLogger("celery_sqs_heartbeat")

_DRAINING = Guard("hand back the waiting messages at shutdown")
_ENDING = Guard("stop the heartbeats at shutdown")


def install(app: Any) -> None:
    """Add the two steps to *app*'s worker and consumer blueprints (a set: twice is
    harmless). At ``worker_init``, before the worker builds its blueprint from them."""
    app.steps["worker"].add(Drain)
    app.steps["consumer"].add(StopBeats)


class Drain(bootsteps.StartStopStep):  # type: ignore[misc]
    """At the worker's close, hand back each waiting message it will not run."""

    label = "celery-sqs-heartbeat drain"
    requires = ("celery.worker.components:Pool",)

    def include(self, w: Any) -> bool:
        # Its close must come before the pool's, which drops the requests waiting for a
        # pool process (billiard's Pool.close clears the worker's semaphore).
        included = bool(super().include(w))
        if included:
            _celery.put_before_pool(w, self)
        return included

    def close(self, w: Any) -> None:
        with _DRAINING:
            drain(w, _process.role().beats)


class StopBeats(bootsteps.StartStopStep):  # type: ignore[misc]
    """Just before kombu releases the unacknowledged messages, end their heartbeats."""

    label = "celery-sqs-heartbeat stop"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def shutdown(self, c: Any) -> None:
        with _ENDING:
            _celery.send_deferred_settles(c)
            _process.role().beats.stop_all(Ended.HANDED_BACK, _celery.active_tags())


def drain(w: Any, beats: Beats) -> int:
    """Hand back what worker *w* will not run (its messages beaten by *beats*); how many
    messages SQS took back."""

    def wanted(request: Any) -> bool:
        message = getattr(request, "message", None)
        return (
            message is not None
            and not message.acknowledged
            and not request.acknowledged
            and not _celery.is_active(request)
            and beats.holds(message.delivery_tag)
        )

    taken = {
        str(r.message.delivery_tag): r
        for r in (
            *_celery.semaphore_waiters(w, wanted),
            *_celery.unwritten_jobs(w, wanted),
            *_celery.timer_entries(w, wanted),
            *_celery.queued_in_executor(w, wanted),
        )
    }
    if not taken:
        return 0
    answers = beats.hand_back(list(taken))
    failed = [(hb, a) for hb, a in answers if a.failure is not None]
    for hb, answer in answers:
        if answer.failure is None:
            # kombu's release at exit must not send a stale receipt handle for it: on
            # SQS that fails, on LocalStack it would hide the copy another worker has.
            _celery.forget(taken[hb.receipt_handle].message)
    handed = len(answers) - len(failed)
    logger.info(
        "celery-sqs-heartbeat: shutting down, this worker will not run %d waiting "
        "message(s); %d made visible again at once for other workers.",
        len(taken),
        handed,
    )
    if failed:
        hb, answer = failed[0]
        denied = answer.failure is Failure.DENIED
        logger.warning(
            "celery-sqs-heartbeat: could not hand back %d waiting message(s) at shutdown "
            "(%s: %s%s); each comes back when its visibility runs out, within %d s.",
            len(failed),
            answer.failure.value if answer.failure else "",
            answer.detail,
            f"; {describe_denied(hb.queue_url, None)}" if denied else "",
            max(h.options.visibility_timeout for h, _ in failed),
        )
    return handed
