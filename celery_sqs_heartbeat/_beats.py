"""The thing that beats: one interface for the sidecar of this process's own and for
the heartbeat process, so that the roles and the shutdown's drain never ask which it is.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from typing import Any, Protocol

from ._heartbeat import Ended, Heartbeat
from ._send import Answer
from ._sidecar import Sidecar

#: How long worker shutdown waits for a sidecar thread to finish a call.
SHUTDOWN_JOIN_TIMEOUT = 2.0


class Beats(Protocol):
    """What beats the messages a worker's main process receives."""

    def add(self, hb: Heartbeat, message: Any) -> None:
        """Beat *hb*'s message (Celery's *message*) from its receipt until Celery
        acknowledges it or its task ends (``task_received``, never waiting)."""

    def holds(self, receipt_handle: str) -> bool:
        """Whether the message is beaten (at shutdown, from the worker's main thread)."""

    def hand_back(self, receipt_handles: Collection[str]) -> list[tuple[Heartbeat, Answer]]:
        """End these messages' heartbeats and make them visible now (``Sidecar.hand_back``)."""

    def stop_all(self, reason: Ended, keep: Collection[str]) -> int:
        """End every heartbeat but those of *keep*; how many ended (``Sidecar.stop_all``)."""

    def close(self) -> None:
        """Stop beating (worker shutdown)."""


class _NoBeats:
    """Nothing beats: a process that serves no heartbeat."""

    def add(self, hb: Heartbeat, message: Any) -> None:
        pass

    def holds(self, receipt_handle: str) -> bool:
        return False

    def hand_back(self, receipt_handles: Collection[str]) -> list[tuple[Heartbeat, Answer]]:
        return []

    def stop_all(self, reason: Ended, keep: Collection[str]) -> int:
        return 0

    def close(self) -> None:
        pass


NO_BEATS: Beats = _NoBeats()


class LocalBeats:
    """A sidecar of this process's own, started once: at ``worker_ready`` (with the
    consumer, whose SQS client's parsed models it shares), or by a message before."""

    def __init__(self, make: Callable[[Any], Sidecar]) -> None:
        self._make = make
        self._lock = threading.Lock()
        self.running: Sidecar | None = None

    def start(self, consumer: Any = None) -> Sidecar:
        """The running sidecar, started now if it is not yet."""
        with self._lock:
            if self.running is None:
                self.running = self._make(consumer)
                self.running.run_in_background()
            return self.running

    def add(self, hb: Heartbeat, message: Any) -> None:
        (self.running or self.start()).add(hb)

    def holds(self, receipt_handle: str) -> bool:
        sidecar = self.running
        return sidecar is not None and sidecar.get(receipt_handle) is not None

    def hand_back(self, receipt_handles: Collection[str]) -> list[tuple[Heartbeat, Answer]]:
        sidecar = self.running
        return [] if sidecar is None else sidecar.hand_back(receipt_handles)

    def stop_all(self, reason: Ended, keep: Collection[str]) -> int:
        sidecar = self.running
        return 0 if sidecar is None else sidecar.stop_all(reason, keep=keep)

    def close(self) -> None:
        with self._lock:
            sidecar, self.running = self.running, None
        if sidecar is not None:
            sidecar.shutdown(SHUTDOWN_JOIN_TIMEOUT)
