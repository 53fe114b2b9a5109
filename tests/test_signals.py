"""The signal handlers in this process, through Celery's own signals on real task objects."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, signals

import celery_sqs_heartbeat
from celery_sqs_heartbeat import _worker
from celery_sqs_heartbeat._settings import resolve_tasks, startup_warnings
from celery_sqs_heartbeat._sidecar import THREAD_NAME

pytestmark = pytest.mark.timeout(60)

QUEUE = "http://127.0.0.1:9/123456789012/q"


@pytest.fixture
def app() -> Iterator[Celery]:
    # Port 9 (discard) on loopback: nothing listens, and the short tasks here must
    # not call SQS at all.
    app = Celery("signals", broker="sqs://127.0.0.1:9", set_as_current=False)
    app.conf.update(sqs_heartbeat_enabled=True, task_acks_late=True, sqs_heartbeat_interval=30)
    celery_sqs_heartbeat.install(app)
    yield app
    celery_sqs_heartbeat.uninstall()


def run_through_signals(task: Any, receipt_handle: str) -> None:
    """What the worker's tracer does around a task: prerun, the task, postrun."""
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
    """Tasks seen first at prerun (a worker started from Python with ``install``) are
    beaten from then on and forgotten at postrun."""
    @app.task(name="signals.short")
    def short() -> None: ...

    run_through_signals(short, "warm-up")
    sidecar = _worker.current_sidecar()
    assert sidecar is not None and len(sidecar) == 0
    threads = threading.active_count()

    for i in range(10_000):
        run_through_signals(short, f"rh-{i}")

    assert len(sidecar) == 0
    assert threading.active_count() == threads and heartbeat_threads() == 1


def test_a_running_task_has_a_heartbeat_until_postrun(app: Celery) -> None:
    @app.task(name="signals.observed")
    def observed() -> None: ...

    observed.push_request(
        id="t1",
        is_eager=False,
        properties={"delivery_tag": "rh-x", "delivery_info": {"sqs_queue": QUEUE}},
    )
    try:
        signals.task_prerun.send(sender=observed, task_id="t1", task=observed)
        sidecar = _worker.current_sidecar()
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

    assert eager.delay(2).get() == 4
    assert eager.apply(args=(3,)).get() == 6
    assert not [r for r in caplog.records if r.levelno > logging.INFO]
    sidecar = _worker.current_sidecar()
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
    # Prefetched messages are beaten while they wait: nothing to warn about.
    assert not any("prefetch" in w for w in warnings)


def test_handlers_never_raise_into_celery(app: Celery, caplog: pytest.LogCaptureFixture) -> None:
    """A broken request is logged once, and the task runs on."""

    class Broken:
        @property
        def task(self) -> Any:
            raise RuntimeError("no task here")

    for _ in range(3):
        signals.task_received.send(sender=None, request=Broken())
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert "could not start a heartbeat for a received message" in errors[0].getMessage()


def test_the_solo_pools_worker_process_init_keeps_the_task_handlers(app: Celery) -> None:
    """The solo pool sends worker_process_init in the worker's own process: that process
    is no prefork pool child, and postrun must still stop the heartbeat at once."""
    signals.worker_process_init.send(sender=None)

    @app.task(name="signals.solo")
    def solo() -> None: ...

    solo.push_request(
        id="t1",
        is_eager=False,
        properties={"delivery_tag": "rh-solo", "delivery_info": {"sqs_queue": QUEUE}},
    )
    try:
        signals.task_prerun.send(sender=solo, task_id="t1", task=solo)
        sidecar = _worker.current_sidecar()
        assert sidecar is not None and len(sidecar) == 1
        signals.task_postrun.send(sender=solo, task_id="t1", task=solo)
        assert len(sidecar) == 0
    finally:
        solo.pop_request()
