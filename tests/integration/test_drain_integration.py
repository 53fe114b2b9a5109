"""The warm shutdown's drain, with real workers: what a draining worker will not run goes
back to the queue at once, and what it will run stays with it (``_drain``).

Each test holds messages in a worker with one pool slot and Celery's default prefetch
multiplier (4): one long task running, the others waiting in the worker. A spare worker
is idle. SIGTERM goes to the draining worker's main process only, as ECS and Kubernetes
send it. The queue's own timeout and the window are 4 s, so a waiting message kept
hidden by its heartbeat would reach the spare only after the long task ends.
"""

from __future__ import annotations

import re
import signal
import time
from typing import Any

import celery
import pytest

from celery_sqs_heartbeat.testing import SQSServer, WorkerProcess, wait_for

from ..conftest import KOMBU_WAIT_SECONDS, RECEIVE_SLACK, Scenario
from .test_worker_integration import timeouts

pytestmark = pytest.mark.timeout(120)

INTERVAL = 1
VISIBILITY = 4
QUEUE_TIMEOUT = 4
#: The draining worker's running task: long enough that waiting for it shows.
LONG_SECONDS = 15
SHORT_SECONDS = 0.5
WAITING = 3
#: From the SIGTERM to the spare worker's start (or receipt) of a handed-back message:
#: the hand-back, the spare's long poll and a loaded machine.
HANDED_BACK_WITHIN = 2 + RECEIVE_SLACK

POOLS_THAT_DROP_THE_QUEUE = ["prefork"] + (["threads"] if celery.VERSION >= (5, 7) else [])


def received(worker: WorkerProcess, task_id: str) -> bool:
    return bool(re.search(rf"Task worker_app\.\w+\[{task_id}\] received", worker.log()))


def drain_conf(scenario: Scenario, **extra: Any) -> dict[str, Any]:
    """The draining worker's settings: a short window, four messages prefetched."""
    return scenario.config(
        queue_timeout=QUEUE_TIMEOUT,
        heartbeat=True,
        interval=INTERVAL,
        visibility=VISIBILITY,
        worker_prefetch_multiplier=4,
        **extra,
    )


def hold_messages(
    scenario: Scenario, pool: str, **options: Any
) -> tuple[dict[str, Any], WorkerProcess, WorkerProcess, str, list[str]]:
    """A draining worker running the long task with *WAITING* short tasks waiting in it
    (sent with *options*), and an idle spare: the settings, both workers, the long
    task's id and the waiting ones'."""
    conf = drain_conf(scenario)
    draining = scenario.worker(conf, pool=pool, name="draining")
    draining.wait_ready(60)
    long_id = scenario.send(conf, "sleep", LONG_SECONDS)
    scenario.wait_starts(long_id, 1, timeout=20)
    waiting = [scenario.send(conf, "sleep", SHORT_SECONDS, **options) for _ in range(WAITING)]
    wait_for(
        lambda: all(received(draining, t) for t in waiting),
        timeout=20,
        what="the draining worker to hold every waiting message",
    )
    (spare,) = scenario.start_workers(conf, 1, pool=pool)
    return conf, draining, spare, long_id, waiting


def sigterm(worker: WorkerProcess) -> float:
    assert worker.process is not None
    worker.process.send_signal(signal.SIGTERM)
    return time.time()


@pytest.mark.parametrize("pool", POOLS_THAT_DROP_THE_QUEUE)
def test_drain_hands_back_the_waiting_messages_at_once(scenario: Scenario, pool: str) -> None:
    """The spare receives the waiting messages within seconds of the SIGTERM, not when
    the long task ends, and runs them; each task runs once, and the long one finishes
    where it started. (Receipt is what the drain decides: how soon the spare then runs
    three prefetched tasks is Celery's pace, 3 s apart in a 5.5 prefork worker with
    the heartbeat on or off.)"""
    _, draining, spare, long_id, waiting = hold_messages(scenario, pool)

    term_at = sigterm(draining)
    wait_for(
        lambda: all(received(spare, t) for t in waiting),
        timeout=HANDED_BACK_WITHIN,
        what="the spare worker to receive the waiting messages",
    )
    print(f"{pool}: waiting messages on the spare {time.time() - term_at:.2f} s after SIGTERM")
    starts = {t: scenario.wait_starts(t, 1, timeout=LONG_SECONDS + 20)[0] for t in waiting}
    assert draining.wait(LONG_SECONDS + 20) == 0
    runs = scenario.wait_settled(timeout=30)

    assert {s.worker for s in starts.values()} == {spare.name}
    assert max(s.at for s in starts.values()) < min(
        r.at for r in runs if r.task_id == long_id and r.event == "end"
    ), "the waiting messages ran only once the long task ended"
    assert [(r.event, r.worker) for r in runs if r.task_id == long_id] == [
        ("start", draining.name),
        ("end", draining.name),
    ]
    for task_id in waiting:
        assert [r.event for r in runs if r.task_id == task_id] == ["start", "end"]
    assert "made visible again at once" in draining.log()


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_drain_hands_back_countdown_messages(scenario: Scenario, pool: str) -> None:
    """Messages held for a countdown are handed back too: the spare receives them within
    seconds of the SIGTERM (and runs them at their time, once)."""
    _, draining, spare, long_id, waiting = hold_messages(scenario, pool, countdown=25)

    term_at = sigterm(draining)
    wait_for(
        lambda: all(received(spare, t) for t in waiting),
        # Elsewhere than moto one more long poll: LocalStack's was seen to return only at
        # its wait time once (1 run in 2) for messages made visible while it waited.
        timeout=HANDED_BACK_WITHIN * (1 if isinstance(scenario.sqs, SQSServer) else 2),
        what="the spare worker to receive the countdown messages",
    )
    print(f"{pool}: countdown messages on the spare {time.time() - term_at:.2f} s after SIGTERM")
    assert draining.wait(LONG_SECONDS + 20) == 0
    runs = scenario.wait_settled(timeout=60)
    for task_id in waiting:
        assert [(r.event, r.worker) for r in runs if r.task_id == task_id] == [
            ("start", spare.name),
            ("end", spare.name),
        ]
    assert [r.event for r in runs if r.task_id == long_id] == ["start", "end"]


def test_drain_keeps_what_a_gevent_worker_will_run(scenario: Scenario) -> None:
    """In the gevent pool every message delivered to the pool runs during the drain: none
    is handed back, each runs once, on the draining worker, kept hidden meanwhile."""
    pytest.importorskip("gevent")
    _, draining, _, long_id, waiting = hold_messages(scenario, "gevent")

    sigterm(draining)
    assert draining.wait(LONG_SECONDS + 20) == 0
    runs = scenario.wait_settled(timeout=30)

    for task_id in [long_id, *waiting]:
        assert [(r.event, r.worker) for r in runs if r.task_id == task_id] == [
            ("start", draining.name),
            ("end", draining.name),
        ]
    assert "made visible again at once" not in draining.log()


#: How long the worker of the next test pauses just after kombu's release at exit.
PAUSE_AFTER_RESTORE = 3


@pytest.mark.needs_request_log("kombu's own visibility changes at exit")
@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_no_beat_follows_kombus_release_at_exit(scenario: Scenario, pool: str) -> None:
    """Messages waiting for a rate limit are not handed back by the drain: kombu releases
    them as the worker exits. From that release on no beat may hide them again: the
    heartbeats end just before it, not at ``worker_shutdown`` a moment later (the test's
    worker pauses in between, long enough for several beats). In a threads worker the
    heartbeat process ends them, asked by the worker's main thread."""
    conf = drain_conf(scenario, task_annotations={"worker_app.plain": {"rate_limit": "1/h"}})
    draining = scenario.worker(
        conf,
        name="draining",
        env={"SQSHB_PAUSE_AFTER_RESTORE": str(PAUSE_AFTER_RESTORE)},
        pool=pool,
    )
    draining.wait_ready(60)
    long_id = scenario.send(conf, "sleep", 4)
    scenario.wait_starts(long_id, 1, timeout=20)
    limited = [scenario.send(conf, "plain", SHORT_SECONDS) for _ in range(WAITING)]
    wait_for(
        lambda: all(received(draining, t) for t in limited),
        timeout=20,
        what="the draining worker to hold the rate-limited messages",
    )

    sigterm(draining)
    assert draining.wait(30) == 0

    late, released = [], 0
    for handle in {h for r in scenario.beats() for h in r.receipt_handles}:
        changes = [r for r in scenario.sqs.visibility_changes([handle]) if r.status == 200]
        back = [r.at for r in changes if timeouts(r) <= {0, KOMBU_WAIT_SECONDS}]
        if back:
            released += 1
            late += [r for r in changes if r.at > min(back) and VISIBILITY in timeouts(r)]
    # Celery 5.4's token bucket lets the first rate-limited task run: kombu says how many
    # it released, and each of them is seen released.
    restored = re.search(r"Restoring (\d+) unacknowledged", draining.log())
    assert restored, "kombu released nothing at exit"
    assert int(restored.group(1)) >= WAITING - 1
    assert released >= int(restored.group(1)), "fewer messages released than kombu says"
    assert not late, f"{len(late)} beat(s) after a message was released"
