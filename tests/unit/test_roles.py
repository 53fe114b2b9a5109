"""The signal handlers and the roles in this process, through Celery's own signals on
real task objects."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery, signals

import celery_sqs_heartbeat
from celery_sqs_heartbeat import _celery, _handlers, _process, _roles
from celery_sqs_heartbeat._send import ACCEPTED
from celery_sqs_heartbeat._settings import prefetch_warnings, resolve_tasks, startup_warnings
from celery_sqs_heartbeat._sidecar import THREAD_NAME
from celery_sqs_heartbeat.testing import wait_for

pytestmark = pytest.mark.timeout(60)

QUEUE = "http://127.0.0.1:9/123456789012/q"


@pytest.fixture
def app() -> Iterator[Celery]:
    # Port 9 (discard) on loopback: nothing listens, and the short tasks here must
    # not call SQS at all.
    app = Celery("signals", broker="sqs://127.0.0.1:9", set_as_current=False)
    app.conf.update(
        sqs_heartbeat_enabled=True,
        task_acks_late=True,
        sqs_heartbeat_interval=30,
        sqs_heartbeat_own_process=False,  # the in-process heartbeat; the heartbeat process: below
    )
    celery_sqs_heartbeat.install(app)
    yield app
    celery_sqs_heartbeat.uninstall()


class Stand(SimpleNamespace):
    """A stand-in for one of Celery's objects, with only the attributes a handler reads."""

    __hash__ = object.__hash__  # Celery's signals cache receivers by sender


def start_worker(app: Celery, pool: str = "threads") -> None:
    """What a worker's start sends: ``worker_init`` from its main process."""
    worker = Stand(app=app, pool_cls=pool, concurrency=1, options={})
    signals.worker_init.send(sender=worker)


def receive(task: Any, receipt_handle: str) -> dict[str, Any]:
    """What the worker's consumer sends for each message: ``task_received``; returns
    Celery's request dict for the message."""
    message = Stand(
        delivery_tag=receipt_handle, delivery_info={"sqs_queue": QUEUE}, acknowledged=False
    )
    request_dict: dict[str, Any] = {}
    request = SimpleNamespace(
        task=task, message=message, id=receipt_handle, request_dict=request_dict
    )
    signals.task_received.send(sender=None, request=request)
    return request_dict


def run_through_signals(task: Any, receipt_handle: str) -> None:
    """What a worker does with a message: receive it, then the tracer's prerun, the
    task, postrun."""
    receive(task, receipt_handle)
    task.push_request(
        id=receipt_handle,
        is_eager=False,
        properties={"delivery_tag": receipt_handle, "delivery_info": {"sqs_queue": QUEUE}},
    )
    try:
        signals.task_prerun.send(sender=task, task_id=receipt_handle, task=task)
        signals.task_postrun.send(sender=task, task_id=receipt_handle, task=task, state="SUCCESS")
    finally:
        task.pop_request()


def heartbeat_threads() -> int:
    return sum(t.name == THREAD_NAME for t in threading.enumerate())


def test_ten_thousand_short_tasks_leave_nothing_behind(app: Celery) -> None:
    """Each message is beaten from its receipt and forgotten at its task's postrun."""

    @app.task(name="signals.short")
    def short() -> None: ...

    start_worker(app)
    run_through_signals(short, "warm-up")
    sidecar = _handlers.current_sidecar()
    assert sidecar is not None and len(sidecar) == 0
    threads = threading.active_count()

    for i in range(10_000):
        run_through_signals(short, f"rh-{i}")

    assert len(sidecar) == 0
    assert threading.active_count() == threads and heartbeat_threads() == 1


def test_a_running_task_has_a_heartbeat_until_postrun(app: Celery) -> None:
    @app.task(name="signals.observed")
    def observed() -> None: ...

    start_worker(app)
    receive(observed, "rh-x")
    observed.push_request(
        id="t1",
        is_eager=False,
        properties={"delivery_tag": "rh-x", "delivery_info": {"sqs_queue": QUEUE}},
    )
    try:
        signals.task_prerun.send(sender=observed, task_id="t1", task=observed)
        sidecar = _handlers.current_sidecar()
        assert sidecar is not None and len(sidecar) == 1
        # A nested eager call in the same thread neither starts nor stops anything.
        observed.apply()
        assert len(sidecar) == 1
        signals.task_postrun.send(sender=observed, task_id="t1", task=observed)
        assert len(sidecar) == 0
    finally:
        observed.pop_request()


def test_eager_tasks_run_without_heartbeat_or_noise(
    app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    app.conf.task_always_eager = True
    caplog.set_level(logging.DEBUG, "celery_sqs_heartbeat")

    @app.task(name="signals.eager")
    def eager(x: int) -> int:
        return x * 2

    start_worker(app)
    assert eager.delay(2).get() == 4
    assert eager.apply(args=(3,)).get() == 6
    assert not [r for r in caplog.records if r.levelno > logging.INFO]
    sidecar = _handlers.current_sidecar()
    assert sidecar is None or len(sidecar) == 0


def test_install_is_idempotent(app: Celery) -> None:
    celery_sqs_heartbeat.install(app)
    celery_sqs_heartbeat.install(app)
    receivers = [r for r in signals.task_prerun.receivers if "celery_sqs_heartbeat" in str(r[0])]
    assert len(receivers) == 1


def test_startup_warnings_name_the_tasks(app: Celery) -> None:
    app.conf.worker_prefetch_multiplier = 4

    @app.task(name="signals.early", acks_late=False)
    def early() -> None: ...

    @app.task(name="signals.late")
    def late() -> None: ...

    warnings = startup_warnings(app, resolve_tasks(app))
    assert any(
        "signals.early" in w and "acks_late" in w and "signals.late" not in w for w in warnings
    )
    # Prefetched messages are beaten while they wait: nothing to warn about...
    assert not any("prefetch" in w for w in warnings)
    found = resolve_tasks(app)
    assert prefetch_warnings(app, found, "prefork") == []
    assert prefetch_warnings(app, found, "thread") == []
    # ...but for the pools in which Celery sees them only once they can start.
    for pool in ("solo", "gevent", "eventlet"):
        (warning,) = prefetch_warnings(app, found, pool)
        assert f"a {pool} worker with worker_prefetch_multiplier=4" in warning
    app.conf.worker_prefetch_multiplier = 1
    assert prefetch_warnings(app, found, "solo") == []


def test_handlers_never_raise_into_celery(app: Celery, caplog: pytest.LogCaptureFixture) -> None:
    """A broken request is logged once, and the task runs on."""

    class Broken:
        @property
        def task(self) -> Any:
            raise RuntimeError("no task here")

    start_worker(app)
    for _ in range(3):
        signals.task_received.send(sender=None, request=Broken())
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert "could not start a heartbeat for a received message" in errors[0].getMessage()


def test_the_solo_pools_worker_process_init_keeps_the_task_handlers(app: Celery) -> None:
    """The solo pool sends worker_process_init in the worker's own process: that process
    is no prefork pool child, and postrun must still stop the heartbeat at once."""

    @app.task(name="signals.solo")
    def solo() -> None: ...

    start_worker(app, pool="solo")
    signals.worker_process_init.send(sender=None)
    receive(solo, "rh-solo")
    solo.push_request(
        id="t1",
        is_eager=False,
        properties={"delivery_tag": "rh-solo", "delivery_info": {"sqs_queue": QUEUE}},
    )
    try:
        signals.task_prerun.send(sender=solo, task_id="t1", task=solo)
        sidecar = _handlers.current_sidecar()
        assert sidecar is not None and len(sidecar) == 1
        signals.task_postrun.send(sender=solo, task_id="t1", task=solo)
        assert len(sidecar) == 0
    finally:
        solo.pop_request()


def test_a_prefork_child_keeps_one_handle_for_its_task(app: Celery) -> None:
    """In a pool child, ``current()`` is the same handle for the whole task, and SQS's
    12-hour limit counts from the message's receipt in the main process."""

    @app.task(name="signals.child")
    def child() -> None: ...

    start_worker(app, pool="prefork")
    main = _process.role()
    assert isinstance(main, _roles.Main) and main.slots is not None
    carried = receive(child, "rh-child")  # in the main process
    stamped = carried["properties"]
    assert stamped[_celery.RECEIVED] > 0
    assert set(carried) == {"properties"}, "the receipt time must not become a header"
    _process.become(_roles.Child(main, main.slots, 0))  # what worker_process_init makes
    child.push_request(
        id="t1",
        is_eager=False,
        properties={**stamped, "delivery_tag": "rh-child", "delivery_info": {"sqs_queue": QUEUE}},
    )
    try:
        signals.task_prerun.send(sender=child, task_id="t1", task=child)
        handle = _handlers.current(child)
        assert handle is not None
        assert handle.configure(interval=10, visibility_timeout=60)
        assert (handle.interval, handle.visibility_timeout) == (10, 60)
        assert _handlers.current(child) is handle
        assert handle._control.heartbeat.received == stamped[_celery.RECEIVED]
        sent: list[tuple[str, int]] = []
        child_role = _process.role()
        assert isinstance(child_role, _roles.Child)
        child_role.tasks.sender = Stand(
            send=lambda url, entries: sent.extend(entries) or [ACCEPTED]
        )
        # Shorter than the window: the main process would read it too late to top it up.
        assert handle.extend(5) and sent == [("rh-child", 60)]
        signals.task_postrun.send(sender=child, task_id="t1", task=child)
        assert _handlers.current(child) is None
    finally:
        child.pop_request()
        main.shutdown()  # its sidecar: the fixture's uninstall stops the child's role


def test_a_threads_worker_beats_from_a_heartbeat_process_that_ends_with_it(app: Celery) -> None:
    """With ``sqs_heartbeat_own_process`` (the default) a threads worker forks a heartbeat
    process at ``worker_ready``: each task takes a slot from prerun to postrun and gives
    it back, ``current()`` is the task's for the whole task, and the heartbeat process exits
    when the heartbeat is uninstalled (worker shutdown)."""
    app.conf.sqs_heartbeat_own_process = True

    @app.task(name="signals.delegated")
    def delegated() -> None: ...

    start_worker(app)
    role = _process.role()
    assert isinstance(role, _roles.Delegating)
    receive(delegated, "rh-early")  # before the heartbeat process: sent to it once it runs
    signals.worker_ready.send(sender=Stand(app=app, pool=None))
    keeper = role.heartbeat_process.keeper
    pid = wait_for(lambda: role.heartbeat_process.pid, timeout=10, what="the heartbeat process")
    assert keeper > 0 and _handlers.current_sidecar() is None
    wait_for(lambda: _handlers.counters().stats().started == 1, timeout=10, what="rh-early")
    free = sorted(role.tasks.free)
    for i in range(100):
        run_through_signals(delegated, f"rh-{i}")
    assert sorted(role.tasks.free) == free and not role.tasks.running

    receive(delegated, "rh-running")
    delegated.push_request(
        id="t1",
        is_eager=False,
        properties={"delivery_tag": "rh-running", "delivery_info": {"sqs_queue": QUEUE}},
    )
    try:
        signals.task_prerun.send(sender=delegated, task_id="t1", task=delegated)
        assert len(role.tasks.free) == len(free) - 1
        handle = _handlers.current(delegated)
        assert handle is not None and _handlers.current(delegated) is handle
        assert handle.receipt_handle == "rh-running"
        signals.task_postrun.send(sender=delegated, task_id="t1", task=delegated)
        assert _handlers.current(delegated) is None
    finally:
        delegated.pop_request()

    _handlers.disconnect()
    with pytest.raises(ChildProcessError):
        os.waitpid(keeper, os.WNOHANG)  # exited, and reaped
    wait_for(
        lambda: not os.path.exists(f"/proc/{pid}"), timeout=5, what="the heartbeat process gone"
    )


def test_the_heartbeat_process_setting_is_validated(app: Celery) -> None:
    app.conf.sqs_heartbeat_own_process = "yes"
    with pytest.raises(SystemExit, match="sqs_heartbeat_own_process='yes'"):
        start_worker(app)


@pytest.mark.parametrize("pool", ["prefork", "threads-heartbeat-process", "threads"])
def test_a_task_without_acks_late_gets_no_handle(app: Celery, pool: str) -> None:
    """Celery deletes its message as it starts: nothing is left to extend, so
    ``current()`` is None in every shape of the task side, and no slot is taken."""
    app.conf.sqs_heartbeat_own_process = pool == "threads-heartbeat-process"

    @app.task(name="signals.early", acks_late=False)
    def early() -> None: ...

    start_worker(app, pool=pool.partition("-")[0])
    main = _process.role()
    if pool == "prefork":
        assert isinstance(main, _roles.Main) and main.slots is not None
        _process.become(_roles.Child(main, main.slots, 0))
    elif pool == "threads":
        assert isinstance(main, _roles.Main)
        main.local.start()
    early.push_request(
        id="t1",
        is_eager=False,
        properties={"delivery_tag": "rh-early", "delivery_info": {"sqs_queue": QUEUE}},
    )
    try:
        signals.task_prerun.send(sender=early, task_id="t1", task=early)
        assert _handlers.current(early) is None
        tasks = _process.role().tasks
        assert not getattr(tasks, "running", None)
        signals.task_postrun.send(sender=early, task_id="t1", task=early)
    finally:
        early.pop_request()
        main.shutdown()


def test_the_renamed_beat_process_setting_stops_the_worker(app: Celery) -> None:
    """Set under its old name, the setting is not silently ignored."""
    app.conf.sqs_heartbeat_beat_process = False
    with pytest.raises(
        SystemExit, match=r"sqs_heartbeat_beat_process=False.*named sqs_heartbeat_own_process"
    ):
        start_worker(app)


class FlakySlots:
    """Slots whose writes fail when told to, as a broken mutex's do (``SlotsBroken``)."""

    capacity = 1

    def __init__(self) -> None:
        self.fail: set[str] = set()
        self.started_keys: list[int] = []

    def attach(self, index: int, pid: int, *, interruptible: bool = False) -> None: ...

    def started(self, index: int, key: int) -> None:
        if "started" in self.fail:
            self.fail.discard("started")
            raise OSError("started")
        self.started_keys.append(key)

    def ended(self, index: int) -> bool:
        if "ended" in self.fail:
            self.fail.discard("ended")
            raise OSError("ended")
        return False


@pytest.mark.parametrize("failing", ["started", "ended", "no postrun"])
def test_a_pool_childs_one_slot_outlives_a_failed_write(app: Celery, failing: str) -> None:
    """A write of its slot that failed once (said by the handler's guard), or a task
    whose end never came, leaves the child's one slot to its next task."""
    from celery_sqs_heartbeat._tasks import SlotTasks

    @app.task(name="signals.slotted")
    def slotted() -> None: ...

    slots = FlakySlots()
    tasks = SlotTasks(app, {}, slots, [0])  # type: ignore[arg-type]
    request = Stand(id="t1", properties={"delivery_tag": "rh-1"})
    slotted.push_request(**vars(request))
    try:
        if failing == "started":
            slots.fail.add("started")
            with pytest.raises(OSError):
                tasks.started(slotted, "t1")
        else:
            tasks.started(slotted, "t1")
            if failing == "ended":
                slots.fail.add("ended")
                with pytest.raises(OSError):
                    tasks.ended("t1")
        tasks.started(slotted, "t2")
        assert tasks.free == [] and len(tasks.running) == 1
        tasks.ended("t2")
        assert tasks.free == [0] and not tasks.running
    finally:
        slotted.pop_request()
