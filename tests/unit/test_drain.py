"""The drain's finders against Celery's real structures, without a worker."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import celery
import pytest
from celery import Celery
from celery.concurrency.thread import TaskPool
from celery.worker.request import Request
from kombu.asynchronous.semaphore import LaxBoundedSemaphore
from kombu.asynchronous.timer import Timer

from celery_sqs_heartbeat import _celery, _drain

pytestmark = pytest.mark.timeout(30)


def request(wanted: bool = True) -> Any:
    req = Request.__new__(Request)  # only identity and a method are needed
    req.wanted = wanted  # type: ignore[attr-defined]
    return req


def wanted(req: Any) -> bool:
    return bool(req.wanted)


def test_install_is_idempotent() -> None:
    app = Celery("t", set_as_current=False)
    _drain.install(app)
    _drain.install(app)
    assert _drain.Drain in app.steps["worker"] and _drain.StopBeats in app.steps["consumer"]


def test_semaphore_waiters_are_taken_off_the_queue() -> None:
    sem = LaxBoundedSemaphore(1)
    sem.acquire(lambda r: None, request())  # takes the only slot
    keep, take = request(wanted=False), request()
    sem.acquire(lambda r: None, keep)
    sem.acquire(lambda r: None, take)

    assert list(_celery.semaphore_waiters(SimpleNamespace(semaphore=sem), wanted)) == [take]
    assert [entry[1][0] for entry in sem._waiting] == [keep]


def test_timer_entries_are_cancelled() -> None:
    timer = Timer()

    def apply_eta_task(req: Any) -> None: ...

    take, keep = request(), request(wanted=False)
    e1 = timer.call_after(60, apply_eta_task, (take,))
    e2 = timer.call_after(60, apply_eta_task, (keep,))
    other = timer.call_after(60, lambda: None)

    assert list(_celery.timer_entries(SimpleNamespace(timer=timer), wanted)) == [take]
    assert (e1.canceled, e2.canceled, other.canceled) == (True, False, False)


@pytest.mark.skipif(celery.VERSION < (5, 7), reason="the threads pool runs its queue")
def test_queued_threads_work_is_cancelled_and_the_rest_put_back_in_order() -> None:
    pool = TaskPool(limit=1)
    busy, release = threading.Event(), threading.Event()
    pool.executor.submit(lambda: (busy.set(), release.wait(10)))
    busy.wait(5)
    reqs = [request(), request(wanted=False), request()]
    for req in reqs:
        pool.on_apply(print, callback=req.on_success)
    try:
        assert _celery.queued_in_executor(SimpleNamespace(pool=pool), wanted) == [
            reqs[0],
            reqs[2],
        ]
        queue = pool.executor._work_queue
        assert queue.qsize() == 1
        item = queue.get_nowait()
        assert item.args[3].__self__ is reqs[1]
        queue.put(item)
    finally:
        release.set()
        pool.executor.shutdown(wait=True)


def test_deferred_acks_and_rejects_are_sent_and_other_operations_left() -> None:
    """Celery 5.4 to 5.6 defer a green worker's acks to the consumer's next turn, which a
    warm shutdown never takes: they are sent before kombu releases what is unacked."""
    from kombu.message import Message
    from vine import ppartial

    settled: list[tuple[str, str]] = []
    channel = SimpleNamespace(
        basic_ack=lambda tag, multiple=False: settled.append(("ack", tag)),
        basic_reject=lambda tag, requeue=False: settled.append(("reject", tag)),
        no_ack_consumers=None,
    )
    acked = Message(channel=channel, delivery_tag="a")
    rejected = Message(channel=channel, delivery_tag="r")
    control = ppartial(lambda: settled.append(("control", "")))
    pending = [
        ppartial(acked.ack_log_error, _celery.logger, ()),
        control,
        ppartial(rejected.reject_log_error, _celery.logger, ()),
    ]
    consumer = SimpleNamespace(_pending_operations=pending, hub=None)

    assert _celery.send_deferred_settles(consumer) == 2
    assert settled == [("ack", "a"), ("reject", "r")]
    assert pending == [control]
    # With an event loop Celery runs them itself; nothing is taken.
    assert _celery.send_deferred_settles(SimpleNamespace(_pending_operations=pending, hub=1)) == 0
    assert pending == [control]
