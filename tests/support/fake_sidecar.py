"""A sidecar on a fake clock: no thread, no SQS, every call answered by a script."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from typing import Any

from celery_sqs_heartbeat._errors import Failure
from celery_sqs_heartbeat._heartbeat import Heartbeat
from celery_sqs_heartbeat._report import Counters, Reporter
from celery_sqs_heartbeat._send import Answer
from celery_sqs_heartbeat._settings import HeartbeatOptions
from celery_sqs_heartbeat._sidecar import Sidecar

OPTIONS = HeartbeatOptions(enabled=True, interval=30, visibility_timeout=120, max_duration=None)
#: More turns than any test's loop needs: a loop that turns without time passing spins.
MAX_TURNS = 1_000_000


class Inline(Executor):
    """Runs each request at once, in the caller's thread."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(fn(*args, **kwargs))
        return future


@dataclasses.dataclass
class Call:
    at: float
    queue_url: str
    entries: list[tuple[str, int]]

    @property
    def handles(self) -> list[str]:
        return [h for h, _ in self.entries]


class World:
    """A sidecar, its fake clock, and the calls it made."""

    def __init__(self, jitter: float = 0.5, fence: Any = None) -> None:
        self.now = 0.0
        self.calls: list[Call] = []
        #: What SQS answers each entry; by default it accepts everything.
        self.answer: Callable[[str], Failure | None] = lambda handle: None
        #: Turns of the loop so far.
        self.turns = 0
        self.sidecar = Sidecar(
            self,  # type: ignore[arg-type]
            Reporter(Counters(), region=lambda: None),
            call_timeout=1.0,
            fence=fence,
            clock=lambda: self.now,
            jitter=lambda: jitter,
            executor=Inline(),
        )

    def send(self, queue_url: str, entries: Sequence[tuple[str, int]]) -> list[Answer]:
        self.calls.append(Call(self.now, queue_url, list(entries)))
        failures = [self.answer(handle) for handle, _ in entries]
        return [Answer(f, "" if f is None else f.value) for f in failures]

    def add(self, rh: str = "rh", queue: str = "q", **changes: Any) -> Heartbeat:
        settled = changes.pop("is_settled", None)
        hb = Heartbeat(rh, queue, dataclasses.replace(OPTIONS, **changes), self.now)
        hb.is_settled = settled
        assert self.sidecar.add(hb)
        return hb

    def check(self) -> None:
        """Called before every turn of the loop: a subclass checks its invariants here."""

    def advance(self, to: float) -> None:
        """Let time pass to *to*, the loop turning as the real one would."""
        while True:
            self.check()
            self.turns += 1
            assert self.turns < MAX_TURNS, "the loop spins"
            wake = self.sidecar.turn(wait=False)
            if wake > to:
                break
            self.now = max(self.now, wake)
        self.now = max(self.now, to)
        self.check()

    def beats_of(self, rh: str) -> list[float]:
        return [c.at for c in self.calls if rh in c.handles]
