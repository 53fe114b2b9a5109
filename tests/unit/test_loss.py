"""What a task learns when its message is lost: the reason, and when another worker may
receive it, from the sidecar's own heartbeat or from the slot the beating process wrote."""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta, timezone

import pytest

from celery_sqs_heartbeat import Loss, LossReason
from celery_sqs_heartbeat._control import InChild, InProcess, TaskHeartbeat
from celery_sqs_heartbeat._errors import Failure
from celery_sqs_heartbeat._heartbeat import Ended, Heartbeat
from celery_sqs_heartbeat._loss import CODES, loss_of, wall_clock
from celery_sqs_heartbeat._report import Counters, Reporter
from celery_sqs_heartbeat._slots import Slots, available, key_of

from ..support.fake_sidecar import OPTIONS, World

pytestmark = pytest.mark.timeout(30)


def near(when: datetime | None, expected: datetime, slack: float = 2.0) -> bool:
    return when is not None and abs((when - expected).total_seconds()) <= slack


@pytest.mark.parametrize(
    ("ended", "reason"),
    [
        (Ended.GONE, LossReason.RECEIPT_INVALID),
        (Ended.MAX_DURATION, LossReason.MAX_DURATION),
        (Ended.LIMIT, LossReason.SQS_LIMIT),
        (Ended.LOST, LossReason.BEATS_FAILED),
        (Ended.DENIED, LossReason.BEATS_FAILED),
        (Ended.TASK_ENDED, None),
        (Ended.SETTLED, None),
        (Ended.HANDED_BACK, None),
    ],
)
def test_each_end_that_loses_the_message_has_one_reason(
    ended: Ended, reason: LossReason | None
) -> None:
    hb = Heartbeat("rh", "q", OPTIONS, time.monotonic())
    assert loss_of(hb) is None  # it beats
    hb.visible_until = time.monotonic() + 100
    hb.end(ended)
    loss = loss_of(hb)
    assert (loss and loss.reason) == reason
    if loss is not None:
        expected = datetime.now(timezone.utc) + timedelta(seconds=100)
        if reason is LossReason.RECEIPT_INVALID:  # another worker may have it already
            expected = datetime.now(timezone.utc)
        assert near(loss.visible_at, expected)


def test_a_loss_before_any_beat_does_not_know_when_the_message_comes_back() -> None:
    """The queue's own timeout from the receipt rules then, which the worker does not know."""
    assert wall_clock(float("inf")) is None
    assert Loss.of(LossReason.MAX_DURATION, float("inf")).visible_at is None


def test_in_process_the_task_sees_why_its_heartbeat_ended() -> None:
    """The sidecar's own heartbeat: gone at a beat (another worker received it)."""
    w = World()
    hb = w.add("rh")
    assert w.sidecar.run("rh") is hb
    handle = TaskHeartbeat(InProcess(w.sidecar, hb))
    assert handle.lost is None and handle.active
    w.answer = lambda rh: Failure.GONE
    w.advance(31)
    lost = handle.lost
    assert lost is not None and lost.reason is LossReason.RECEIPT_INVALID
    assert not handle.active and handle.extend(10) is False


def test_in_process_max_duration_is_seen_and_was_known_in_advance() -> None:
    w = World()
    hb = w.add("rh", max_duration=60)
    w.sidecar.run("rh")
    handle = TaskHeartbeat(InProcess(w.sidecar, hb))
    deadline = handle.deadline  # started at 0 on the fake clock: 60 s + one window
    assert deadline is not None
    w.advance(100)
    lost = handle.lost
    assert lost is not None and lost.reason is LossReason.MAX_DURATION
    assert hb.visible_until <= 60 + OPTIONS.visibility_timeout  # within the deadline


@pytest.mark.skipif(not available(), reason="no process-shared robust mutexes here")
def test_a_slot_carries_the_loss_from_the_beating_process_to_its_task_only() -> None:
    """The beating process writes it (a field of its own); only the task of that
    message reads it: the slot's next task starts without it."""
    slots = Slots(1)
    slots.attach(0, os.getpid())
    key = key_of("rh-1")
    slots.started(0, key)
    hb = Heartbeat("rh-1", "q", OPTIONS, time.monotonic())
    hb.started = time.monotonic()
    reporter = Reporter(Counters(), region=lambda: None)
    handle = TaskHeartbeat(InChild(slots, 0, hb, lambda: None, reporter))
    assert handle.lost is None and handle.active
    until = time.monotonic() + 50
    slots.lose(0, key_of("another"), CODES[LossReason.BEATS_FAILED], until)  # not its own
    assert handle.lost is None
    slots.lose(0, key, CODES[LossReason.BEATS_FAILED], until)
    lost = handle.lost
    assert lost is not None and lost.reason is LossReason.BEATS_FAILED
    assert near(lost.visible_at, datetime.now(timezone.utc) + timedelta(seconds=50))
    assert not handle.active
    slots.ended(0)
    slots.started(0, key_of("rh-2"))
    assert slots.loss(0, key_of("rh-2")) is None


@pytest.mark.skipif(not available(), reason="no process-shared robust mutexes here")
def test_the_sidecar_tells_the_slot_when_a_slotted_heartbeat_is_lost() -> None:
    """In a prefork worker's main process (or the heartbeat process) the sidecar's
    heartbeat ends lost at a beat: the task's slot says so at once."""
    slots = Slots(1)
    slots.attach(0, os.getpid())
    slots.started(0, key_of("rh"))
    w = World(fence=slots)
    w.now = time.monotonic()
    w.add("rh")
    w.answer = lambda rh: Failure.GONE
    w.advance(w.now + 40)  # its first beat, on the grid
    said = slots.loss(0, key_of("rh"))
    assert said is not None and said[0] == CODES[LossReason.RECEIPT_INVALID]


# -- redeliveries -------------------------------------------------------------------------


def test_a_message_handed_out_before_is_counted_and_offered_to_receivers() -> None:
    from celery_sqs_heartbeat import signals

    seen: list[dict[str, object]] = []

    def on_redelivered(**kwargs: object) -> None:
        seen.append(kwargs)

    signals.message_redelivered.connect(on_redelivered, weak=False)
    try:
        reporter = Reporter(Counters(), region=lambda: None)
        first = Heartbeat("rh-1", "q", OPTIONS, 0.0, "t", "id", message_id="m", receive_count=1)
        again = Heartbeat("rh-2", "q", OPTIONS, 0.0, "t", "id", message_id="m", receive_count=3)
        unknown = Heartbeat("rh-3", "q", OPTIONS, 0.0, "t", "id")  # kombu 5.5: not fetched
        for hb in (first, again, unknown):
            reporter.started(hb)
        assert reporter.counters.stats().messages_redelivered == 1
        ((event),) = seen
        assert event["message_id"] == "m" and event["receive_count"] == 3
        assert event["receipt_handle"] == "rh-2" and event["task_id"] == "id"
    finally:
        signals.message_redelivered.disconnect(on_redelivered)


def test_kombus_receive_count_and_message_id_are_read_at_receipt() -> None:
    from types import SimpleNamespace

    from celery_sqs_heartbeat._celery import heartbeat_of, receive_count

    raw = {"MessageId": "m-1", "Attributes": {"ApproximateReceiveCount": "2"}}
    message = SimpleNamespace(
        delivery_info={"sqs_queue": "q", "sqs_message": raw},
        delivery_tag="rh",
        acknowledged=False,
    )
    task = SimpleNamespace(name="t")
    request = SimpleNamespace(task=task, message=message, id="id", request_dict={})
    hb = heartbeat_of(request, {"t": OPTIONS}, carry_received=False, settled=True)
    assert hb is not None and (hb.message_id, hb.receive_count) == ("m-1", 2)
    assert receive_count({}) == 0 and receive_count({"Attributes": {}}) == 0


def test_a_copy_received_while_the_first_is_unsettled_is_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Kept by a weak reference: a request Celery dropped counts as settled, and holds
    no memory here."""
    import gc

    from celery_sqs_heartbeat._roles import _Copies

    class Request:  # Celery's request: weakly referenced, with its kombu message
        def __init__(self) -> None:
            self.acknowledged = False
            self.message = type("Message", (), {"acknowledged": False})()

    def hb(n: int) -> Heartbeat:
        return Heartbeat(f"rh-{n}", "q", OPTIONS, 0.0, "t", "id", message_id="m", receive_count=n)

    copies = _Copies()
    first = Request()
    copies.received(hb(1), first)
    assert not caplog.records
    second = Request()
    copies.received(hb(2), second)  # the first is still unsettled here
    (record,) = caplog.records
    assert record.levelname == "WARNING" and "received again (message m" in record.getMessage()
    caplog.clear()
    second.message.acknowledged = True  # Celery settled the second copy
    copies.received(hb(3), Request())  # gone from memory by now: no duplicate either
    del first, second
    gc.collect()
    copies.received(hb(4), Request())
    assert not caplog.records


# -- a hard time limit bounds the heartbeat -----------------------------------------------


@pytest.mark.parametrize(
    ("message", "task", "worker", "max_duration", "expected"),
    [
        ((None, None), 5, 0.0, None, 5.0),  # the task's time_limit
        ((3, None), 5, 0.0, None, 3.0),  # apply_async(time_limit=3) wins, as in Celery
        ((None, None), None, 7.0, None, 7.0),  # the worker's --time-limit
        ((None, None), None, 0.0, None, None),  # no limit at all
        ((None, None), 5, 0.0, 60.0, 60.0),  # the task's own max_duration stays
        ((None, None), 5, None, None, None),  # a pool that kills nothing at the limit
    ],
)
def test_a_prefork_tasks_hard_time_limit_is_its_max_duration_by_default(
    message: tuple[int | None, int | None],
    task: int | None,
    worker: float | None,
    max_duration: float | None,
    expected: float | None,
) -> None:
    """The pool kills the task then: no beat needs to go past it."""
    import dataclasses
    from types import SimpleNamespace

    from celery_sqs_heartbeat._celery import heartbeat_of

    options = dataclasses.replace(OPTIONS, max_duration=max_duration)
    sqs_message = SimpleNamespace(
        delivery_info={"sqs_queue": "q"}, delivery_tag="rh", acknowledged=False
    )
    request = SimpleNamespace(
        task=SimpleNamespace(name="t", time_limit=task),
        message=sqs_message,
        id="id",
        request_dict={},
        time_limits=message,
    )
    hb = heartbeat_of(
        request, {"t": options}, carry_received=False, settled=True, time_limit=worker
    )
    assert hb is not None and hb.options.max_duration == expected


def test_only_a_prefork_worker_bounds_the_heartbeat_by_the_time_limit() -> None:
    """The threads, solo and eventlet pools enforce no hard limit, and gevent's cannot
    stop a greenlet that never yields: there a bound would let the message go while its
    task still runs."""
    from types import SimpleNamespace

    from celery import Celery

    from celery_sqs_heartbeat import _roles

    app = Celery("limits", broker="sqs://127.0.0.1:9", set_as_current=False)
    app.conf.update(sqs_heartbeat_enabled=True, task_acks_late=True)

    @app.task(name="limits.t")
    def t() -> None: ...

    found = {}
    for pool in ("prefork", "threads", "gevent"):
        worker = SimpleNamespace(app=app, pool_cls=pool, concurrency=1, options={}, time_limit=300)
        role = _roles.for_worker(worker)
        found[pool] = getattr(role, "time_limit", None)
        role.shutdown()
    assert found == {"prefork": 300.0, "threads": None, "gevent": None}


def test_a_broken_slot_reads_as_no_loss_and_never_reaches_the_task() -> None:
    """``ENOTRECOVERABLE`` on the slot's mutex: ``current().lost`` is None (the beating
    process says the broken slot, and the heartbeat's end, in its own log lines)."""
    from celery_sqs_heartbeat._slots import SlotsBroken

    class Broken:
        def loss(self, index: int, key: int) -> None:
            raise SlotsBroken(131, "pthread_mutex_lock failed")

    hb = Heartbeat("rh", "q", OPTIONS, time.monotonic())
    handle = TaskHeartbeat(
        InChild(Broken(), 0, hb, lambda: None, Reporter(Counters(), region=lambda: None))  # type: ignore[arg-type]
    )
    assert handle.lost is None and handle.active
