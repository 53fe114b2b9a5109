"""The sidecar thread against errors a server cannot produce (botocore's Stubber), and its
stop guarantees (a client that blocks on demand)."""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.stub import Stubber

from celery_sqs_heartbeat._errors import Failure
from celery_sqs_heartbeat._heartbeat import Ended, Heartbeat
from celery_sqs_heartbeat._report import Counters, Reporter
from celery_sqs_heartbeat._send import Sender
from celery_sqs_heartbeat._settings import HeartbeatOptions
from celery_sqs_heartbeat._sidecar import MAX_CALLS, STOP_WAIT, THREAD_NAME, Sidecar
from celery_sqs_heartbeat.testing import wait_for

pytestmark = pytest.mark.timeout(30)

QUEUE = "https://sqs.us-east-1.amazonaws.com/123456789012/jobs"
FAST = HeartbeatOptions(enabled=True, interval=0.05, visibility_timeout=5, max_duration=None)


@pytest.fixture
def sidecars() -> Iterator[list[Sidecar]]:
    made: list[Sidecar] = []
    yield made
    for s in made:
        s.shutdown(5)
        # A call still in flight must not log into the next test.
        s._executor.shutdown(wait=True)


def make(client: Any, region: str | None = None, **kwargs: Any) -> Sidecar:
    reporter = Reporter(Counters(), region=lambda: region)
    return Sidecar(Sender(lambda url: client), reporter, call_timeout=1.0, **kwargs)


def start(sidecars: list[Sidecar], client: Any, region: str | None = None) -> Sidecar:
    sidecar = make(client, region)
    sidecar.run_in_background()
    sidecars.append(sidecar)
    return sidecar


def begin(
    sidecar: Sidecar,
    rh: str,
    queue: str,
    options: HeartbeatOptions,
    task_name: str = "",
    task_id: str = "",
    now: float | None = None,
) -> Heartbeat:
    """What task_received does: a heartbeat from the message's receipt."""
    received = time.monotonic() if now is None else now
    hb = Heartbeat(rh, queue, options, received, task_name, task_id)
    assert sidecar.add(hb)
    return hb


def expect_beat(stubber: Stubber, rh: str = "rh-1", timeout: int = 5) -> None:
    stubber.add_response(
        "change_message_visibility",
        {},
        {"QueueUrl": QUEUE, "ReceiptHandle": rh, "VisibilityTimeout": timeout},
    )


def test_thread_is_named_daemon_and_stops(
    stubbed: tuple[Any, Stubber], sidecars: list[Sidecar]
) -> None:
    client, _ = stubbed
    sidecar = start(sidecars, client)
    thread = next(t for t in threading.enumerate() if t.name == THREAD_NAME)
    assert thread.daemon
    sidecar.shutdown(5)
    assert not thread.is_alive()


def test_throttling_is_retried_and_logged_once(
    stubbed: tuple[Any, Stubber], sidecars: list[Sidecar], caplog: pytest.LogCaptureFixture
) -> None:
    client, stubber = stubbed
    for _ in range(3):
        stubber.add_client_error(
            "change_message_visibility", "RequestThrottled", "Rate exceeded", 400
        )
    # Two beats after the throttling, and room for more while the test stops it.
    spare = 20
    for _ in range(2 + spare):
        expect_beat(stubber)
    sidecar = start(sidecars, client)
    caplog.set_level(logging.DEBUG, "celery_sqs_heartbeat")

    begin(sidecar, "rh-1", QUEUE, FAST, task_name="t", task_id="id")
    wait_for(lambda: len(stubber._queue) <= spare, timeout=10, what="the stubbed calls")
    assert sidecar.stop("rh-1")

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len([r for r in warnings if "RequestThrottled" in r.getMessage()]) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_access_denied_ends_the_heartbeat_with_one_error_naming_the_action(
    stubbed: tuple[Any, Stubber], sidecars: list[Sidecar], caplog: pytest.LogCaptureFixture
) -> None:
    client, stubber = stubbed
    for _ in range(2):
        stubber.add_client_error("change_message_visibility", "AccessDenied", "not authorized", 403)
    sidecar = start(sidecars, client, region="us-east-1")

    begin(sidecar, "rh-1", QUEUE, FAST)
    begin(sidecar, "rh-2", QUEUE, HeartbeatOptions(True, 0.3, 5, None))
    wait_for(lambda: len(sidecar) == 0, timeout=10, what="both heartbeats to end")

    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors
    assert "sqs:ChangeMessageVisibility" in errors[0]
    assert "arn:aws:sqs:us-east-1:123456789012:jobs" in errors[0]


def test_batch_entries_fail_one_by_one(
    stubbed: tuple[Any, Stubber], sidecars: list[Sidecar], caplog: pytest.LogCaptureFixture
) -> None:
    client, stubber = stubbed
    stubber.add_response(
        "change_message_visibility_batch",
        {
            "Successful": [{"Id": "0"}],
            "Failed": [
                {
                    "Id": "1",
                    "SenderFault": True,
                    "Code": "ReceiptHandleIsInvalid",
                    "Message": "gone",
                }
            ],
        },
    )
    clock = [0.0]
    sidecar = make(client, clock=lambda: clock[0])
    sidecars.append(sidecar)
    options = HeartbeatOptions(True, 10, 30, None)
    begin(sidecar, "a", QUEUE, options, now=0.0)
    begin(sidecar, "b", QUEUE, options, now=0.0)
    clock[0] = 10.0
    sidecar.turn(wait=False)  # hands the request to an executor thread

    # "b" was gone, "a" beats on
    wait_for(
        lambda: any("no longer in flight" in r.getMessage() for r in caplog.records),
        timeout=5,
        what="the batch to be settled and reported",
    )
    assert len(sidecar) == 1


def test_stop_waits_for_the_call_in_flight_and_no_beat_follows(
    sidecars: list[Sidecar],
) -> None:
    """Once stop returns, nothing more is sent for that message; a call answered within
    STOP_WAIT is waited for, so it cannot land after kombu's delete or requeue."""
    entered, release = threading.Event(), threading.Event()
    calls: list[tuple[str, float]] = []
    stop_returned = threading.Event()

    class SlowClient:
        def change_message_visibility(self, **kw: Any) -> dict[str, Any]:
            calls.append((kw["ReceiptHandle"], threading.get_ident()))
            entered.set()
            release.wait(5)
            assert not stop_returned.is_set(), "a beat was still running after stop returned"
            return {}

    sidecar = start(sidecars, SlowClient())
    begin(sidecar, "rh", QUEUE, FAST)
    assert entered.wait(5)

    stopper = threading.Thread(target=lambda: (sidecar.stop("rh"), stop_returned.set()))
    stopper.start()
    assert not stop_returned.wait(STOP_WAIT / 2), "stop returned while the call was in flight"
    release.set()
    stopper.join(5)
    assert stop_returned.is_set()
    count = len(calls)
    sidecar.shutdown(5)
    assert len(calls) == count


def test_a_stalled_call_neither_holds_stop_nor_delays_other_heartbeats(
    sidecars: list[Sidecar],
) -> None:
    """A call that never answers: stop returns after STOP_WAIT, and another queue's
    heartbeat keeps its cadence meanwhile (calls go out on separate executor threads)."""
    stalled_queue = QUEUE + "-stalled"
    release = threading.Event()
    stalled = threading.Event()
    beats: list[float] = []

    class Client:
        def change_message_visibility(self, **kw: Any) -> dict[str, Any]:
            if kw["QueueUrl"] == stalled_queue:
                stalled.set()
                release.wait(10)
            else:
                beats.append(time.monotonic())
            return {}

    sidecar = start(sidecars, Client())
    begin(sidecar, "stalled", stalled_queue, FAST)
    begin(sidecar, "healthy", QUEUE, FAST)
    assert stalled.wait(5)
    began = time.monotonic()
    sidecar.stop("stalled")
    assert time.monotonic() - began < STOP_WAIT + 0.2
    # Several intervals of the healthy heartbeat go by while the other call hangs.
    before = len(beats)
    wait_for(lambda: len(beats) >= before + 5, timeout=5, what="healthy beats")
    gaps = [b - a for a, b in itertools.pairwise(beats[before:])]
    assert max(gaps) < FAST.interval + 0.2, gaps
    release.set()


def test_an_unexpected_error_never_escapes(
    sidecars: list[Sidecar], caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        def change_message_visibility(self, **kw: Any) -> None:
            raise RuntimeError("boom")

    sidecar = start(sidecars, Broken())
    begin(sidecar, "rh", QUEUE, FAST)
    wait_for(lambda: any(r.exc_info for r in caplog.records), timeout=5, what="a traceback")
    assert sidecar.running
    assert sidecar.stop("rh")


def test_signals_and_stats_follow_each_event(
    stubbed: tuple[Any, Stubber], sidecars: list[Sidecar]
) -> None:
    """Our own signals fire for start, beat, failure, loss and stop; stats count them."""
    from celery_sqs_heartbeat import signals

    client, stubber = stubbed
    expect_beat(stubber, "rh-ok")
    stubber.add_client_error("change_message_visibility", "RequestThrottled", "slow", 400)
    stubber.add_client_error("change_message_visibility", "ReceiptHandleIsInvalid", "gone", 400)
    seen: list[tuple[str, dict[str, Any]]] = []

    def receiver(name: str, sender: object = None, **kw: Any) -> None:
        seen.append((name, kw))

    receivers = {name: functools.partial(receiver, name) for name in signals.__all__}
    for name, receiver in receivers.items():
        getattr(signals, name).connect(receiver, weak=False)
    try:
        sidecar = start(sidecars, client)
        # A long interval, so that its next beat cannot take the stubbed errors below.
        begin(sidecar, "rh-ok", QUEUE, HeartbeatOptions(True, 0.5, 5, None), "t", "1")
        wait_for(lambda: any(n == "beat_sent" for n, _ in seen), timeout=5, what="a beat")
        sidecar.stop("rh-ok")
        begin(sidecar, "rh-gone", QUEUE, FAST, "t", "2")
        wait_for(lambda: any(n == "message_lost" for n, _ in seen), timeout=5, what="a loss")
    finally:
        for name, receiver in receivers.items():
            getattr(signals, name).disconnect(receiver)

    names = [n for n, _ in seen]
    assert names == [
        "heartbeat_started",
        "beat_sent",
        "heartbeat_stopped",
        "heartbeat_started",
        "beat_failed",
        "beat_failed",
        "message_lost",
        "heartbeat_stopped",
    ], names
    sent = dict(seen)["beat_sent"]
    assert sent["receipt_handle"] == "rh-ok" and sent["beats"] == 1 and sent["lateness"] >= 0
    assert [kw["failure"] for n, kw in seen if n == "beat_failed"] == ["transient", "gone"]
    assert [kw["reason"] for n, kw in seen if n == "heartbeat_stopped"] == [
        "task ended",
        "message gone",
    ]
    stats = sidecar.stats()
    assert (stats.active, stats.started, stats.stopped, stats.beats_sent) == (0, 2, 2, 1)
    assert stats.failures == {"transient": 1, "gone": 1} and stats.messages_lost == 1


SLOW = HeartbeatOptions(enabled=True, interval=30, visibility_timeout=120, max_duration=None)


def test_a_manual_extension_never_raises_into_the_task(
    stubbed: tuple[Any, Stubber], sidecars: list[Sidecar], caplog: pytest.LogCaptureFixture
) -> None:
    """Throttled: False and one warning; denied: False and the heartbeat ends."""
    client, stubber = stubbed
    stubber.add_client_error("change_message_visibility", "RequestThrottled", "slow down", 400)
    stubber.add_response(
        "change_message_visibility",
        {},
        {"QueueUrl": QUEUE, "ReceiptHandle": "rh-1", "VisibilityTimeout": 600},
    )
    stubber.add_client_error("change_message_visibility", "AccessDenied", "no", 403)
    sidecar = start(sidecars, client)
    hb = begin(sidecar, "rh-1", QUEUE, SLOW, "t", "id")

    with caplog.at_level(logging.WARNING, logger="celery_sqs_heartbeat"):
        assert sidecar.extend(hb, 600) is False
        assert sidecar.extend(hb, 600) is True
        assert sidecar.extend(hb, 600) is False

    assert sidecar.get("rh-1") is None  # denied ends it
    assert sidecar.extend(hb, 600) is False  # and nothing more is sent
    stats = sidecar.stats()
    assert stats.beats_sent == 1 and stats.failures == {"transient": 1, "denied": 1}
    assert "Extension of task t[id]" in caplog.text
    stubber.assert_no_pending_responses()


def test_calls_go_out_on_a_few_named_daemon_threads(sidecars: list[Sidecar]) -> None:
    """However many requests are due at once, at most MAX_CALLS threads make them."""
    release = threading.Event()

    class Client:
        def change_message_visibility(self, **kw: Any) -> dict[str, Any]:
            release.wait(5)
            return {}

    sidecar = start(sidecars, Client())
    for i in range(3 * MAX_CALLS):  # one queue each: one request each
        begin(sidecar, f"rh{i}", f"{QUEUE}-{i}", FAST)
    wait_for(
        lambda: (
            sum(t.name.startswith(f"{THREAD_NAME}-send") for t in threading.enumerate())
            == MAX_CALLS
        ),
        timeout=5,
        what="the executor's threads",
    )
    senders = [t for t in threading.enumerate() if t.name.startswith(f"{THREAD_NAME}-send")]
    assert len(senders) == MAX_CALLS and all(t.daemon for t in senders)
    release.set()


def test_a_request_that_waited_for_a_free_thread_sends_nothing_once_stopped(
    sidecars: list[Sidecar],
) -> None:
    """Every executor thread is stuck in a stalled call; a beat taken meanwhile waits in
    the executor's queue. Its task ends (stop returns after STOP_WAIT): when a thread
    frees up, nothing is sent for that message."""
    release = threading.Event()
    calls: list[str] = []

    class Client:
        def change_message_visibility(self, **kw: Any) -> dict[str, Any]:
            calls.append(kw["ReceiptHandle"])
            if kw["ReceiptHandle"].startswith("stalled"):
                release.wait(10)
            return {}

    sidecar = start(sidecars, Client())
    for i in range(MAX_CALLS):  # one queue each: one request, one thread each
        begin(sidecar, f"stalled{i}", f"{QUEUE}-{i}", FAST)
    wait_for(lambda: len(calls) >= MAX_CALLS, timeout=5, what="every thread stalled")
    queued = begin(sidecar, "queued", QUEUE, FAST)
    wait_for(lambda: queued.in_flight, timeout=5, what="the beat taken")
    assert sidecar.stop("queued")
    release.set()
    sidecar.shutdown(5)
    sidecar._executor.shutdown(wait=True)
    assert "queued" not in calls


# -- shutdown --------------------------------------------------------------------------------


def test_hand_back_ends_the_heartbeats_and_asks_for_visibility_zero(
    stubbed: tuple[Any, Stubber],
) -> None:
    """One batched call per queue with visibility 0, only for messages that still have a
    heartbeat; each heartbeat ends as handed back, and no later beat is planned."""
    client, stubber = stubbed
    sidecar = make(client)
    for rh in ("rh-1", "rh-2"):
        begin(sidecar, rh, QUEUE, FAST)
    stubber.add_response(
        "change_message_visibility_batch",
        {"Successful": [{"Id": "0"}], "Failed": []},
        {
            "QueueUrl": QUEUE,
            "Entries": [
                {"Id": "0", "ReceiptHandle": "rh-1", "VisibilityTimeout": 0},
                {"Id": "1", "ReceiptHandle": "rh-2", "VisibilityTimeout": 0},
            ],
        },
    )

    answers = sidecar.hand_back(["rh-1", "rh-2", "rh-1", "unknown"])

    stubber.assert_no_pending_responses()
    assert [(hb.receipt_handle, a.failure) for hb, a in answers] == [
        ("rh-1", None),
        ("rh-2", None),
    ]
    assert {hb.ended for hb, _ in answers} == {Ended.HANDED_BACK}
    assert len(sidecar) == 0


def test_hand_back_reports_a_refused_call_and_never_raises(stubbed: tuple[Any, Stubber]) -> None:
    client, stubber = stubbed
    sidecar = make(client)
    begin(sidecar, "rh-1", QUEUE, FAST)
    stubber.add_client_error("change_message_visibility", "AccessDenied", http_status_code=403)

    ((hb, answer),) = sidecar.hand_back(["rh-1"])

    assert answer.failure is Failure.DENIED
    assert hb.ended is Ended.HANDED_BACK


def test_stop_all_keeps_the_running_ones(stubbed: tuple[Any, Stubber]) -> None:
    client, _ = stubbed
    sidecar = make(client)
    for rh in ("rh-1", "rh-2", "rh-3"):
        begin(sidecar, rh, QUEUE, FAST)

    assert sidecar.stop_all(Ended.HANDED_BACK, keep={"rh-2"}) == 2
    assert sidecar.get("rh-2") is not None and len(sidecar) == 1
