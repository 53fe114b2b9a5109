"""The shutdown's drain: the messages a stopping worker will not run go back at once.

At a warm shutdown Celery finishes the running tasks, which may take hours, and drops
the messages still waiting in the worker: kombu releases them only as the worker exits.
Until then the heartbeat would keep them hidden from every other worker. Two worker
bootsteps, added to the app at ``worker_init`` (before Celery builds its blueprints from
``app.steps``), fix that:

* :class:`Drain`, a worker step after the pool's, whose ``close`` runs once Celery's
  event loop has stopped and before anything drops or drains (the close phase of the
  worker's blueprint; the consumer and the pool are stopped in the stop phase after it).
  It takes out of Celery's hands each waiting message that Celery would not run, so it
  cannot run here any more, ends its heartbeat and sets its visibility to 0 in one
  batched call per queue, then drops it from kombu's unacknowledged set, so kombu's own
  release at exit sends nothing for it. What it takes, as read in Celery's and kombu's
  sources of each series (5.4 to 5.7):

  - a prefork request waiting for a free pool process (the worker's semaphore); Celery
    clears those in ``Consumer.on_close``;
  - a prefork job in the pool's outbound buffer whose writing to a child has not begun
    (not accepted, no process chosen); ``AsynPool.flush`` clears those;
  - an ETA or countdown request in the event loop's timer (prefork, threads and solo
    pools): its timer entry is cancelled first, so it cannot fire during the drain;
  - on Celery 5.7, a threads-pool request still queued in the executor, whose future it
    cancels (5.7 shuts the executor down with ``cancel_futures``; 5.4 to 5.6 run the
    queue, so there it takes nothing).

  It takes nothing from the gevent and eventlet pools (their timers fire entries during
  the drain on some series, and everything delivered to them runs), nothing waiting for
  a rate limit, and never a request that is acknowledged or active. Such messages keep
  their heartbeat until Celery settles them or the step below ends it.
* :class:`StopBeats`, a consumer step after ``Tasks``, whose ``shutdown`` runs just
  before ``Connection.shutdown``, where kombu releases every message still
  unacknowledged. It ends every heartbeat but those of tasks still running (a threads
  task that a cold shutdown could not cancel), so no beat hides again a message kombu
  has just released.

A failed hand-back is logged once and never raised: that message comes back when its
visibility runs out, within one window of its last beat, as it would without the drain.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from queue import Empty
from typing import Any

from celery import bootsteps

from ._errors import Failure, describe_denied
from ._heartbeat import Ended
from ._worker import Role, _Guard, current_role

logger = logging.getLogger("celery_sqs_heartbeat")

#: The Celery series from which the threads pool cancels its queued work at shutdown
#: (``TaskPool.on_stop``: ``executor.shutdown(cancel_futures=True)``).
THREADS_CANCEL_QUEUED = (5, 7)
#: The names of the consumer's methods an ETA or countdown timer entry calls.
ETA_CALLBACKS = frozenset({"apply_eta_task", "_limit_post_eta"})

#: The kombu ``Message`` methods that Celery defers as a task's ack or reject.
SETTLES = frozenset({"ack_log_error", "reject_log_error"})

_Wanted = Callable[[Any], bool]

_DRAINING = _Guard("hand back the waiting messages at shutdown")
_ENDING = _Guard("stop the heartbeats at shutdown")


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
        # pool process (billiard's Pool.close clears the worker's semaphore). Bootsteps
        # are ordered by their requirements alone, and none can say "before": so this
        # step, included just after the pool's, moves itself in front of it.
        from celery.worker.components import Pool

        included = bool(super().include(w))
        pool = next((s for s in w.steps if isinstance(s, Pool)), None)
        if included and pool is not None:
            w.steps.remove(self)
            w.steps.insert(w.steps.index(pool), self)
        return included

    def close(self, w: Any) -> None:
        with _DRAINING:
            drain(w, current_role())


class StopBeats(bootsteps.StartStopStep):  # type: ignore[misc]
    """Just before kombu releases the unacknowledged messages, end their heartbeats."""

    label = "celery-sqs-heartbeat stop"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def shutdown(self, c: Any) -> None:
        from celery.worker.state import active_requests

        with _ENDING:
            send_deferred_settles(c)
            running = {_tag(r) for r in tuple(active_requests)}
            current_role().stop_all(Ended.HANDED_BACK, running)


def send_deferred_settles(c: Any) -> int:
    """Send now the acks and rejects that Celery deferred in consumer *c*; how many.

    Without an event loop (the gevent and eventlet pools), Celery 5.4 to 5.6 queue each
    task's ack or reject in ``Consumer._pending_operations``, which runs only at the top of
    the consumer's next turn. A warm shutdown ends the loop without that turn, so a task
    that finished in its last seconds is still unacknowledged when kombu releases what is
    unacknowledged at exit: its message is made visible again, and another worker runs it
    a second time. (Celery 5.7 sends acks at once: ``Consumer.call_soon_ack``.)
    Remote-control operations queued beside them are left as Celery leaves them.
    """
    pending = getattr(c, "_pending_operations", None)
    if not pending or getattr(c, "hub", None) is not None:
        return 0
    settles = [p for p in tuple(pending) if _is_settle(p)]
    for operation in settles:
        pending.remove(operation)
        try:
            operation()
        except Exception:  # kombu logs a broker's error itself; this is anything else
            logger.exception(
                "celery-sqs-heartbeat: could not send a deferred acknowledgement at "
                "shutdown; kombu releases that message at exit."
            )
    if settles:
        logger.info(
            "celery-sqs-heartbeat: shutting down, sent %d acknowledgement(s) of finished "
            "tasks that Celery had deferred, before kombu releases what is unacknowledged.",
            len(settles),
        )
    return len(settles)


def _is_settle(operation: Any) -> bool:
    """Whether a deferred operation (a ``vine.promise``) acks or rejects a message."""
    from kombu.message import Message

    fun = getattr(operation, "fun", None)
    return getattr(fun, "__name__", "") in SETTLES and isinstance(
        getattr(fun, "__self__", None), Message
    )


def drain(w: Any, role: Role) -> int:
    """Hand back what worker *w* will not run (its heartbeat served by *role*); how many
    messages SQS took back."""
    from celery.worker.state import active_requests

    def wanted(request: Any) -> bool:
        message = getattr(request, "message", None)
        return (
            message is not None
            and not message.acknowledged
            and not request.acknowledged
            and request not in active_requests
            and role.holds(message.delivery_tag)
        )

    taken = {
        _tag(r): r
        for r in (
            *_semaphore_waiters(w, wanted),
            *_unwritten_jobs(w, wanted),
            *_timer_entries(w, wanted),
            *_queued_in_executor(w, wanted),
        )
    }
    if not taken:
        return 0
    answers = role.hand_back(list(taken))
    failed = [(hb, a) for hb, a in answers if a.failure is not None]
    for hb, answer in answers:
        if answer.failure is None:
            # kombu's release at exit must not send a stale receipt handle for it: on
            # SQS that fails, on LocalStack it would hide the copy another worker has.
            message = taken[hb.receipt_handle].message
            message.channel.qos.ack(message.delivery_tag)
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


def _tag(request: Any) -> str:
    return str(request.message.delivery_tag)


def _request(candidate: Any) -> Any:
    """*candidate* if it is a Celery request, else None."""
    from celery.worker.request import Request

    return candidate if isinstance(candidate, Request) else None


def _semaphore_waiters(w: Any, wanted: _Wanted) -> Iterator[Any]:
    """Prefork requests waiting for a free pool process (``kombu``'s
    ``LaxBoundedSemaphore``: ``(callback, args, kwargs)`` each), taken off the queue."""
    waiting = getattr(getattr(w, "semaphore", None), "_waiting", None)
    if waiting is None:
        return
    for entry in tuple(waiting):
        args = entry[1] if len(entry) > 1 else ()
        request = _request(args[0]) if args else None
        if request is not None and wanted(request):
            waiting.remove(entry)
            yield request


def _unwritten_jobs(w: Any, wanted: _Wanted) -> Iterator[Any]:
    """Prefork jobs in the pool's outbound buffer that no child process was chosen for
    (``AsynPool.schedule_writes`` sets ``_scheduled_for`` and ``_write_to`` as it
    begins a write; a child that took the job sets ``_accepted``), discarded."""
    from celery.worker.state import reserved_requests

    buffer = getattr(getattr(getattr(w, "pool", None), "_pool", None), "outbound_buffer", None)
    if not buffer:
        return
    by_job: dict[int, Any] = {}
    for request in tuple(reserved_requests):
        ref = getattr(request, "_apply_result", None)
        job = ref() if ref is not None else None
        if job is not None:
            by_job[id(job)] = request
    for job in tuple(buffer):
        request = by_job.get(id(job))
        if (
            request is not None
            and not job._accepted
            and job._write_to is None
            and job._scheduled_for is None
            and wanted(request)
        ):
            buffer.remove(job)
            job.discard()
            yield request


def _timer_entries(w: Any, wanted: _Wanted) -> Iterator[Any]:
    """ETA and countdown requests in the event loop's timer, their entries cancelled.
    Only kombu's event-loop timer (prefork, threads, solo): the green pools' timers are
    their own."""
    from kombu.asynchronous.timer import Timer

    timer = getattr(w, "timer", None)
    if not isinstance(timer, Timer):
        return
    for scheduled in timer.queue:
        entry = scheduled[2]
        args = getattr(entry, "args", None) or ()
        request = _request(args[0]) if args else None
        if (
            request is not None
            and not entry.canceled
            and getattr(entry.fun, "__name__", "") in ETA_CALLBACKS
            and wanted(request)
        ):
            timer.cancel(entry)  # type: ignore[no-untyped-call]
            yield request


def _queued_in_executor(w: Any, wanted: _Wanted) -> list[Any]:
    """Celery 5.7 threads-pool requests still queued in the executor, cancelled.

    The pool keeps no reference to its futures (the request's ``_apply_result`` is a
    weak reference to an object nothing else holds), so the executor's queue is read:
    emptied, each wanted item's future cancelled, and the others put back in order. A
    thread that frees up meanwhile waits for them; an item taken out never runs.
    """
    import celery
    from celery.concurrency.thread import TaskPool

    pool = getattr(w, "pool", None)
    queue = getattr(getattr(pool, "executor", None), "_work_queue", None)
    if (
        tuple(celery.VERSION[:2]) < THREADS_CANCEL_QUEUED
        or not isinstance(pool, TaskPool)
        or queue is None
    ):
        return []
    items, taken = [], []
    try:
        with contextlib.suppress(Empty):
            while True:
                items.append(queue.get_nowait())
        for item in list(items):
            # A _WorkItem of ``executor.submit(apply_target, target, args, kwargs,
            # callback, ...)``: its callback is the request's ``on_success``.
            submitted: tuple[Any, ...] = getattr(item, "args", None) or ()
            callback = submitted[3] if len(submitted) > 3 else None
            request = _request(getattr(callback, "__self__", None))
            future = getattr(item, "future", None)
            if (
                request is not None
                and isinstance(future, Future)
                and wanted(request)
                and future.cancel()
            ):
                items.remove(item)
                taken.append(request)
    finally:
        for item in items:
            queue.put(item)
    return taken
