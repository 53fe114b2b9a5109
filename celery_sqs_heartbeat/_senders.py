"""A few named daemon threads that make the sidecar's SQS calls, one request each.

The sidecar thread decides what to send and when; these threads only wait on the network.
A call that stalls (an endpoint that accepts the connection and never answers) then holds
up only its own request, for at most the client's time-out, and never the next beats of
the process's other heartbeats. Threads are made on demand, up to :data:`MAX_SENDERS`,
and live as long as the sidecar: a busy process does not create a thread per beat, and
a quiet one has at most one.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

logger = logging.getLogger("celery_sqs_heartbeat")

#: Most calls in flight at once in one process. A request carries up to 10 heartbeats of
#: one queue, so this many stalled calls hold up to 40 heartbeats before a fifth request
#: must wait its turn, and still at most one client time-out.
MAX_SENDERS = 4

Job = Callable[[], None]


class Senders:
    """Runs jobs (one SQS request each) on up to *limit* threads named after *name*."""

    def __init__(self, name: str, limit: int = MAX_SENDERS) -> None:
        self._name = name
        self._limit = limit
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        #: Jobs submitted and not yet finished (waiting or running).
        self._outstanding = 0
        self._closed = False

    @property
    def busy(self) -> bool:
        """Whether a call is queued or in flight."""
        return self._outstanding > 0

    @property
    def threads(self) -> int:
        return len(self._threads)

    def submit(self, job: Job) -> None:
        """Run *job* on a free thread, starting one if none is free and the limit allows."""
        with self._lock:
            if self._closed:
                return
            self._outstanding += 1
            if self._outstanding > len(self._threads) and len(self._threads) < self._limit:
                thread = threading.Thread(
                    target=self._serve, name=f"{self._name}-{len(self._threads) + 1}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
        self._jobs.put(job)

    def shutdown(self, timeout: float | None = None) -> None:
        """Let each thread finish its call, then end; jobs not yet begun are dropped."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(None)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout)

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None or self._closed:
                return
            try:
                job()
            except Exception:  # pragma: no cover - a bug; keep the heartbeats alive
                logger.exception("celery-sqs-heartbeat: unexpected error sending a beat")
            finally:
                with self._lock:
                    self._outstanding -= 1
