"""SQS faults between real workers and the loopback SQS server (``fault_proxy``).

The workers' broker endpoint is the proxy; faults hit only the heartbeat's visibility
changes, so the worker's own receives and deletes go on. Pace as the issue sets it:
a beat every second, each keeping the message hidden for six.

* An outage shorter than (visibility timeout - interval) loses nothing: the task runs
  once, beats resume, the late beat is logged.
* A longer one ends as SQS ends it: the message is delivered again, and the first
  worker's heartbeat says it lost the message (and the task is none the wiser). This is
  also the twin of the first: the same task, the same queue, a duplicate.
* A call that stalls holds up neither the task, nor its acknowledgement, nor the beats
  of another task in the same process.
* An endpoint without ``ChangeMessageVisibilityBatch`` gets single calls, and concurrent
  long tasks still run once (its twin, with the heartbeat off, runs each twice).
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_sqs_heartbeat._sidecar import STOP_WAIT
from celery_sqs_heartbeat.testing import RecordedRequest, wait_for

from ..conftest import SQS, Scenario
from ..support.fault_proxy import KINDS, FaultProxy

pytestmark = pytest.mark.timeout(120)

INTERVAL = 1
VISIBILITY = 6
#: The queue's own timeout: what the message has before its first beat.
QUEUE_TIMEOUT = 6
#: Shorter than VISIBILITY - INTERVAL, so the last beat before it still covers it, and
#: longer than INTERVAL + half that margin, so the first beat after it is late whatever
#: the outage's phase against the beats (lateness >= SHORT_OUTAGE - INTERVAL = 3.5 s).
SHORT_OUTAGE = 4.5
#: Longer than VISIBILITY: the message's visibility runs out in the middle of it.
LONG_OUTAGE = 9.0
TASK_SECONDS = 9
#: A beat is late when it comes more than half the margin (VISIBILITY - INTERVAL) late.
LATE_LOG = "was late by"


@pytest.fixture
def proxy(sqs: SQS) -> Iterator[FaultProxy]:
    if not sqs.port:
        pytest.skip("needs a plain-HTTP SQS endpoint to put the fault-injecting proxy before")
    with FaultProxy((sqs.host, sqs.port)) as p:
        yield p


def accepted_beats(scenario: Scenario, queue: str = "") -> list[RecordedRequest]:
    return [
        r
        for r in scenario.beats(queue)
        if r.status == 200 and r.params.get("VisibilityTimeout", VISIBILITY) == VISIBILITY
    ]


def wait_first_beat(scenario: Scenario, queue: str = "") -> None:
    wait_for(lambda: accepted_beats(scenario, queue), timeout=30, what=f"a first beat on {queue}")


@pytest.mark.parametrize(
    ("pool", "kind"), [("threads", kind) for kind in KINDS] + [("prefork", "throttle")]
)
def test_an_outage_shorter_than_the_margin_loses_nothing(
    scenario: Scenario, proxy: FaultProxy, pool: str, kind: str
) -> None:
    conf = scenario.config(
        queue_timeout=QUEUE_TIMEOUT, heartbeat=True, interval=INTERVAL, visibility=VISIBILITY
    )
    scenario.worker(conf, pool=pool, broker_url=proxy.broker_url).wait_ready(60)
    task_id = scenario.send(conf, "sleep", TASK_SECONDS)
    wait_first_beat(scenario)

    proxy.fault(kind, SHORT_OUTAGE)
    outage_end = time.time() + SHORT_OUTAGE
    runs = scenario.wait_settled(timeout=TASK_SECONDS + 30)

    assert [r.event for r in runs] == ["start", "end"]
    assert len(proxy.injected(kind)) >= 2, "the outage did not hit the heartbeat"
    assert [b for b in accepted_beats(scenario) if b.at > outage_end], "beats did not resume"
    log = scenario.logs()
    assert LATE_LOG in log
    assert log.count("failed (transient") == 1, "a failure is logged once per outage"
    assert f"Task worker_app.sleep[{task_id}] succeeded" in log
    assert "message_lost" not in log and "may be delivered to another worker" not in log


def test_an_outage_longer_than_the_window_redelivers_and_says_so(
    scenario: Scenario, proxy: FaultProxy
) -> None:
    conf = scenario.config(
        queue_timeout=QUEUE_TIMEOUT, heartbeat=True, interval=INTERVAL, visibility=VISIBILITY
    )
    scenario.start_workers(conf, 2, pool="threads", broker_url=proxy.broker_url)
    task_id = scenario.send(conf, "sleep", TASK_SECONDS + 1)
    wait_first_beat(scenario)

    proxy.fault("refuse", LONG_OUTAGE)
    runs = scenario.wait_settled(timeout=2 * TASK_SECONDS + 40)

    starts = [r for r in runs if r.event == "start"]
    assert len(starts) == 2, "SQS delivers the message again once its visibility runs out"
    assert starts[0].receipt_handle != starts[1].receipt_handle
    first = next(w for w in scenario.workers if w.name == starts[0].worker)
    assert len(first.log_lines("SQS did not answer")) == 1
    # The task itself never noticed: both runs ended and succeeded.
    assert sum(r.event == "end" for r in runs) == 2
    assert scenario.logs().count(f"Task worker_app.sleep[{task_id}] succeeded") == 2


@pytest.mark.needs_request_log("kombu's DeleteMessage request, to time the acknowledgement")
def test_a_stalled_call_holds_up_nothing_else(
    scenario: Scenario, proxy: FaultProxy, tmp_path: Path
) -> None:
    """Two tasks in one threads worker, on two queues; every visibility change on the
    first queue stalls. The second task's beats keep their pace, and when the first task
    ends in the middle of a stalled call, its message is deleted at once."""
    other = f"{scenario.queue}-b"
    conf = scenario.config(
        queue_timeout=QUEUE_TIMEOUT, heartbeat=True, interval=INTERVAL, visibility=VISIBILITY
    )
    scenario.worker(
        conf,
        pool="threads",
        concurrency=2,
        broker_url=proxy.broker_url,
        queues=(scenario.queue, other),
    ).wait_ready(60)
    gate = tmp_path / "end-first-task"
    first = scenario.send(conf, "until_file", str(gate), 30)
    second = scenario.send(conf, "sleep", TASK_SECONDS, queue=other)
    wait_first_beat(scenario)
    wait_first_beat(scenario, other)

    stall_began = time.time()
    proxy.fault("stall", 30, queue=scenario.queue)
    wait_for(lambda: proxy.stalled_now, timeout=10, what="a stalled call")
    wait_for(lambda: proxy.injected("stall")[2:], timeout=10, what="three stalled calls")
    wait_for(lambda: proxy.stalled_now, timeout=10, what="a call stalled right now")
    gate.touch()

    end = wait_for(
        lambda: [r for r in scenario.runs(first) if r.event == "end"], timeout=10, what="its end"
    )[0]
    deleted = wait_for(
        lambda: scenario.requests("DeleteMessage"), timeout=10, what="its acknowledgement"
    )[0]
    assert deleted.at - end.at < STOP_WAIT + 0.35, "the acknowledgement waited for the stall"
    assert end.at - gate.stat().st_mtime < 0.5, "the task was held up"

    scenario.wait_starts(second, 1, timeout=5)
    wait_for(
        lambda: [r for r in scenario.runs(second) if r.event == "end"],
        timeout=TASK_SECONDS + 10,
        what="the second task to end",
    )
    beats = [b.at for b in accepted_beats(scenario, other) if b.at > stall_began]
    assert len(beats) >= 3
    gaps = [b - a for a, b in itertools.pairwise(beats)]
    assert max(gaps) < INTERVAL + 0.5, f"the other heartbeat was held up: {gaps}"
    assert len(scenario.starts(first)) == len(scenario.starts(second)) == 1


@pytest.mark.parametrize("heartbeat", [True, False])
def test_an_endpoint_without_the_batch_action_still_runs_each_task_once(
    scenario: Scenario, proxy: FaultProxy, heartbeat: bool
) -> None:
    """Six concurrent long tasks on two threads workers, through an endpoint that answers
    every ChangeMessageVisibilityBatch with UnsupportedOperation. Each worker has room for
    all six, so the twin's messages are taken again as soon as they are visible."""
    proxy.fault("unsupported", 600, actions=frozenset({"ChangeMessageVisibilityBatch"}))
    conf = scenario.config(
        queue_timeout=QUEUE_TIMEOUT, heartbeat=heartbeat, interval=INTERVAL, visibility=VISIBILITY
    )
    workers = scenario.start_workers(
        conf, 2, pool="threads", concurrency=6, broker_url=proxy.broker_url
    )
    ids = [scenario.send(conf, "sleep", TASK_SECONDS) for _ in range(6)]

    runs = scenario.wait_settled(timeout=3 * TASK_SECONDS + 40)

    starts = collections.Counter(r.task_id for r in runs if r.event == "start")
    if heartbeat:
        assert starts == collections.Counter(ids), starts
        assert proxy.injected("unsupported"), "no batch was tried"
        said = [w for w in workers if w.log_lines("does not support ChangeMessageVisibilityBatch")]
        assert said and all(len(w.log_lines("ChangeMessageVisibilityBatch")) == 1 for w in said)
        assert accepted_beats(scenario)
    else:
        assert all(starts[i] >= 2 for i in ids), starts
