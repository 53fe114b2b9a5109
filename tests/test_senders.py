"""The sender threads: made on demand, bounded, named, daemon, and stopped."""

from __future__ import annotations

import threading

import pytest

from celery_sqs_heartbeat._senders import MAX_SENDERS, Senders
from celery_sqs_heartbeat.testing import wait_for

pytestmark = pytest.mark.timeout(30)


def test_threads_are_made_on_demand_up_to_the_limit() -> None:
    senders = Senders("test-send")
    release = threading.Event()
    running: list[str] = []

    def job() -> None:
        running.append(threading.current_thread().name)
        release.wait(10)

    senders.submit(job)
    wait_for(lambda: running, timeout=5, what="the first job")
    assert senders.threads == 1 and senders.busy
    for _ in range(2 * MAX_SENDERS):
        senders.submit(job)
    wait_for(lambda: len(running) == MAX_SENDERS, timeout=5, what="every thread busy")
    assert senders.threads == MAX_SENDERS
    assert sorted(running) == [f"test-send-{i}" for i in range(1, MAX_SENDERS + 1)]
    threads = [t for t in threading.enumerate() if t.name.startswith("test-send-")]
    assert all(t.daemon for t in threads)
    release.set()
    wait_for(lambda: not senders.busy, timeout=5, what="the queued jobs to run")
    assert len(running) == 2 * MAX_SENDERS + 1
    senders.shutdown(5)
    assert not any(t.is_alive() for t in threads)


def test_a_quiet_process_keeps_one_thread() -> None:
    senders = Senders("test-quiet")
    done = threading.Event()
    for _ in range(20):
        done.clear()
        senders.submit(done.set)
        assert done.wait(5)
        wait_for(lambda: not senders.busy, timeout=5, what="the job to finish")
    assert senders.threads == 1
    senders.shutdown(5)
