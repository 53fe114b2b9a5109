"""The one background loop per worker that beats every message the worker holds.

It owns the registry of heartbeats, keyed by receipt handle: only its methods change a
:class:`~._heartbeat.Heartbeat`, and only under its lock, held for a few stores and never
across I/O, a receiver of our signals, or another process's lock. ``stop`` is final:
once it returns no beat for that message is sent. One turn of the loop, the delivery of
a request and what stopping waits for: ``docs/how-it-works.md`` (the sidecar loop).
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import NamedTuple

from ._fence import Fence, Fenced
from ._heartbeat import STOP_WAIT, Ended, Heartbeat, Outcome, allowed
from ._loss import CODES, reason_of
from ._report import STARTED, STOPPED, Reports, Stats, say_stalled
from ._send import MAX_BATCH, Answer, Sender
from ._slots import SlotView
from ._turn import earliest, look

__all__ = ["STOP_WAIT", "Sidecar"]

logger = logging.getLogger("celery_sqs_heartbeat")

#: The loop thread's name, as shown by py-spy, faulthandler and ``threading.enumerate``;
#: the executor's threads are ``celery-sqs-heartbeat-send_0``...
THREAD_NAME = "celery-sqs-heartbeat"
#: Calls in flight at once. A request carries up to ten beats of one queue, so this many
#: stalled calls hold up to 40 heartbeats, each for at most one client time-out.
MAX_CALLS = 4
#: After an unexpected error in the loop, it waits this long before going on, so a bug
#: cannot spin a CPU.
LOOP_ERROR_PAUSE = 1.0
#: A manual extension waits at most this much longer than the client's time-out for a
#: regular beat in flight, so the two never race.
EXTEND_WAIT_MARGIN = 1.0
#: A loop whose last turn is older than its longest sleep by more than this is stuck:
#: one turn of 5,000 heartbeats takes about 0.01 s.
TURN_SLACK = 1.0


class _Beat(NamedTuple):
    """A beat taken to be sent: its heartbeat, and the latest due time at which it goes
    now (a rider's is later than now)."""

    hb: Heartbeat
    until: float


class _Ask(NamedTuple):
    """An entry of a request, as sent: the visibility it asks for."""

    hb: Heartbeat
    asked: int


class Sidecar:
    """Serves all heartbeats of one worker from one named daemon thread."""

    def __init__(
        self,
        sender: Sender,
        reporter: Reports,
        *,
        call_timeout: float,
        fence: Fence | None = None,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
        executor: Executor | None = None,
        wake_every: float = math.inf,
        on_lost: Callable[[Heartbeat], None] | None = None,
    ) -> None:
        self._sender = sender
        self._report = reporter
        #: The counters' block this sidecar writes ``started`` and ``stopped`` to.
        self._counts = reporter.counters.own
        self._call_timeout = call_timeout
        self._fence = None if fence is None else Fenced(fence)
        #: Told of each heartbeat that ended with its message lost, after the report
        #: (without the lock): the interrupt (``sqs_heartbeat_interrupt``).
        self._on_lost = on_lost
        self._clock = clock
        self._jitter = jitter
        #: Every heartbeat not yet ended, by receipt handle.
        self._beats: dict[str, Heartbeat] = {}
        self._lock = threading.Lock()
        #: Wakes the callers waiting for a call in flight (stop, extend).
        self._answered = threading.Condition(self._lock)
        #: Wakes the sleeping loop: a beat due sooner than it planned, or shutdown.
        self._wake = threading.Event()
        #: When the sleeping loop wakes by itself; infinity while it turns, so that
        #: anything due meanwhile wakes the next turn.
        self._wake_at = math.inf
        #: The shortest interval of any heartbeat so far: the loop wakes at least this
        #: often, so a new message (whose first beat is an interval away) never has to
        #: wake it; a wake-up would cost Celery's thread a GIL hand-off.
        self._shortest = math.inf
        #: The loop wakes at least this often anyway (the heartbeat process's: its health is
        #: judged by it, see :meth:`healthy`).
        self._wake_every = wake_every
        #: When the loop last began a turn (:meth:`healthy`).
        self._turned = clock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        #: An unexpected error has been said (``_deliver``).
        self._failed = False
        self._executor = executor or ThreadPoolExecutor(
            MAX_CALLS, thread_name_prefix=f"{THREAD_NAME}-send"
        )

    # -- Celery's side: a dict under the lock, no I/O ------------------------------------

    def add(self, hb: Heartbeat, *, counted: bool = True, told: bool = False) -> bool:
        """Begin beating *hb*'s message; False if it already has a heartbeat. Not
        *counted*: the worker counted it as it received it (a worker with a heartbeat
        process). *told*: its start was reported already."""
        with self._lock:
            if hb.receipt_handle in self._beats:
                return False
            self._beats[hb.receipt_handle] = hb
            if counted:  # else another writer counts it, under another lock
                self._counts[STARTED] += 1
            if hb.options.interval < self._shortest:
                self._shortest = hb.options.interval
                self._wake.set()
        if not told:
            self._report.started(hb)
        return True

    def get(self, receipt_handle: str) -> Heartbeat | None:
        with self._lock:
            return self._beats.get(receipt_handle)

    def run(self, receipt_handle: str) -> Heartbeat | None:
        """Its task started in this process: its heartbeat (None: the message has none)."""
        with self._lock:
            hb = self._beats.get(receipt_handle)
            if hb is not None and hb.started is None:
                hb.started = self._clock()
            return hb

    def stop(self, receipt_handle: str, reason: Ended = Ended.TASK_ENDED) -> bool:
        """End the heartbeat of a message; once this returns no beat for it is sent."""
        return self._end(receipt_handle, reason) is not None

    def _end(self, receipt_handle: str, reason: Ended) -> Heartbeat | None:
        """:meth:`stop`, returning the heartbeat it ended (None: there was none)."""
        with self._lock:
            hb = self._beats.pop(receipt_handle, None)
            if hb is None:
                return None
            self._counts[STOPPED] += 1
            hb.end(reason)
            answered = self._wait_in_flight(hb, STOP_WAIT)
            beats = hb.beats
        if not answered:
            say_stalled(hb, STOP_WAIT)
        self._say_ended(hb, beats)
        return hb

    # -- shutdown, from the worker's main thread ---------------------------------------

    def hand_back(self, receipt_handles: Iterable[str]) -> list[tuple[Heartbeat, Answer]]:
        """End the heartbeats of messages the worker will not run, and ask SQS, from the
        caller's thread, to make each visible again now (visibility 0). Only a message
        with a heartbeat here is handed back: one whose heartbeat ended (lost, gone, a
        limit) may be with another worker by now. Returns each with SQS's answer."""
        ended = [
            hb for rh in dict.fromkeys(receipt_handles) if (hb := self._end(rh, Ended.HANDED_BACK))
        ]
        by_queue: dict[str, list[Heartbeat]] = {}
        for hb in ended:
            by_queue.setdefault(hb.queue_url, []).append(hb)
        answers: list[tuple[Heartbeat, Answer]] = []
        for queue_url, beats in by_queue.items():
            for i in range(0, len(beats), MAX_BATCH):
                batch = beats[i : i + MAX_BATCH]
                sent = self._sender.send(queue_url, [(hb.receipt_handle, 0) for hb in batch])
                answers += zip(batch, sent, strict=True)
        return answers

    def stop_all(self, reason: Ended, *, keep: Collection[str] = ()) -> int:
        """End every heartbeat but those of *keep* (receipt handles); how many ended."""
        with self._lock:
            handles = [rh for rh in self._beats if rh not in keep]
        return sum(self.stop(rh, reason) for rh in handles)

    # -- manual control, from the task's thread ---------------------------------------

    def extend(self, hb: Heartbeat, seconds: int) -> bool:
        """Ask SQS now, from the caller's thread, to keep *hb*'s message hidden *seconds*
        more (cut to SQS's 12-hour limit); True when SQS accepted it."""
        with self._lock:
            if self._beats.get(hb.receipt_handle) is not hb:
                return False
            waited = 2 * self._call_timeout + EXTEND_WAIT_MARGIN
            answered = self._wait_in_flight(hb, waited)
            sent = self._clock()
            asked = allowed(seconds, sent, hb.received)
            if not answered or hb.ended is not None or isinstance(asked, Ended):
                asked = 0
            else:
                hb.in_flight = True
        if not answered:
            say_stalled(hb, waited)
        if not asked:
            return False
        answer = self._sender.send(hb.queue_url, [(hb.receipt_handle, asked)])[0]
        with self._lock:
            outcome = self._apply(hb, sent, asked, answer, self._clock(), manual=True)
        self._tell(outcome)
        return answer.failure is None

    def reconfigure(self, hb: Heartbeat, interval: float, visibility_timeout: int) -> bool:
        """Change *hb*'s interval and window from its next beat on."""
        with self._lock:
            if self._beats.get(hb.receipt_handle) is not hb:
                return False
            hb.reconfigure(interval, visibility_timeout)
            self._note_due(hb)
            return True

    # -- under the lock -----------------------------------------------------------------

    def _wait_in_flight(self, hb: Heartbeat, waited: float) -> bool:
        """Wait up to *waited* s for a call in flight for *hb* (releasing the lock while
        it waits); False if it is still out."""
        if not hb.in_flight:
            return True  # the usual case: no clock read
        deadline = self._clock() + waited
        while hb.in_flight:
            left = deadline - self._clock()
            if left <= 0:
                return False
            self._answered.wait(left)
        return True

    def _note_due(self, hb: Heartbeat) -> None:
        """Wake the loop if *hb* is due before it planned to wake."""
        if hb.ended is None and hb.next_due < self._wake_at:
            self._wake.set()

    def _drop(self, hb: Heartbeat) -> bool:
        """Drop *hb* from the registry; False if it was no longer there."""
        if self._beats.get(hb.receipt_handle) is not hb:
            return False
        del self._beats[hb.receipt_handle]
        self._counts[STOPPED] += 1
        return True

    def _apply(
        self, hb: Heartbeat, sent: float, asked: int, answer: Answer, now: float, *, manual: bool
    ) -> Outcome:
        """Apply SQS's answer to a call for *hb*: the one path for beats and extensions."""
        outcome = hb.answered(sent, asked, answer, now, self._jitter(), manual=manual)
        if outcome.ended:
            self._drop(hb)
        self._note_due(hb)
        self._answered.notify_all()
        return outcome

    def _tell(self, outcome: Outcome) -> None:
        """Report an applied answer (without the lock: receivers are user code)."""
        self._report.outcome(outcome)
        if outcome.ended:
            self._say_ended(outcome.hb, outcome.beats, outcome.answer.detail)

    def _say_ended(self, hb: Heartbeat, beats: int, detail: str = "") -> None:
        """Report that *hb* ended (without the lock); where its message was lost and its
        task writes a slot, tell the task there first (``current().lost``): whoever
        hears of the end may look there at once."""
        reason = None if self._fence is None and self._on_lost is None else reason_of(hb.ended)
        if reason is not None and self._fence is not None:
            self._fence.lose(hb, CODES[reason])
        self._report.ended(hb, beats, detail)
        if reason is not None and self._on_lost is not None:
            self._on_lost(hb)

    def stats(self) -> Stats:
        return self._report.counters.stats()

    def __len__(self) -> int:
        with self._lock:
            return len(self._beats)

    # -- lifecycle ----------------------------------------------------------------------

    def run_in_background(self) -> None:
        """Start the thread. Calling it again is an error: one thread per sidecar."""
        if self._thread is not None:
            raise RuntimeError("the heartbeat sidecar thread is already running")
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def healthy(self, now: float) -> bool:
        """Whether the loop still turns: it wakes at least once per shortest interval
        (and *wake_every*), so a last turn older than that (and a little) means it is
        stuck."""
        longest = min(self._shortest, self._wake_every)
        return self.running and now - self._turned <= longest + TURN_SLACK

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop the threads; heartbeats still registered simply stop beating."""
        self._stopping.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- the loop -----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.turn()
            except Exception:  # pragma: no cover - a bug; keep the heartbeats alive
                logger.exception("celery-sqs-heartbeat: unexpected error in the sidecar loop")
                self._stopping.wait(LOOP_ERROR_PAUSE)

    def turn(self, *, wait: bool = True) -> float:
        """One turn of the loop (see the module's docstring).

        Returns when the next beat is due (infinity: none); with *wait*, sleeps until
        then, or until the loop is woken.
        """
        now = self._turned = self._clock()  # before the copy: one added after is due later
        with self._lock:
            self._wake_at = math.inf
            beats = list(self._beats.values())
            shortest = self._shortest
        found = look(beats, now)
        with self._lock:
            ended = [hb for hb in found.settled if self._drop(hb) and hb.end(Ended.SETTLED)]
            requests = self._take(found.candidates)
        for hb in ended:
            self._say_ended(hb, hb.beats)
        for queue_url, entries in requests.items():
            for i in range(0, len(entries), MAX_BATCH):
                self._executor.submit(self._deliver, queue_url, entries[i : i + MAX_BATCH])
        # Beats just submitted are in flight, not counted here: their answers wake the
        # loop if they are due again sooner. So the loop never turns again at once, and
        # the executor's threads do not find it holding the lock they need next.
        wake = min(now + min(shortest, self._wake_every), earliest(beats))
        if wait and not self._stopping.is_set():
            with self._lock:
                self._wake_at = wake
            self._wake.wait(None if wake == math.inf else max(0.0, wake - self._clock()))
            self._wake.clear()
        return wake

    def _take(self, candidates: list[tuple[Heartbeat, float]]) -> dict[str, list[_Beat]]:
        """Under the lock: mark each candidate in flight and group them per queue."""
        requests: dict[str, list[_Beat]] = {}
        for hb, until in candidates:
            if self._beats.get(hb.receipt_handle) is hb and not hb.in_flight:
                hb.in_flight = True
                requests.setdefault(hb.queue_url, []).append(_Beat(hb, until))
        return requests

    def _deliver(self, queue_url: str, entries: list[_Beat]) -> None:
        """Send one request and apply its answers; runs on an executor thread, which would keep
        an error to itself: a bug is said once, and its beats are planned again."""
        try:
            self._send(queue_url, entries)
        except Exception:  # pragma: no cover - a bug
            if not self._failed:
                self._failed = True
                logger.exception(
                    "celery-sqs-heartbeat: unexpected error sending beats to %s; they are "
                    "tried again (said once).",
                    queue_url,
                )
            with self._lock:
                now = self._clock()
                for beat in entries:
                    if beat.hb.in_flight:
                        beat.hb.in_flight = False
                        beat.hb.put_off(now)
                        self._note_due(beat.hb)
                self._answered.notify_all()

    def _send(self, queue_url: str, entries: list[_Beat]) -> None:
        """Send one request and apply its answers.

        The prefork slots are read here, just before the call: a request that waited for
        a free executor thread sees what its tasks did meanwhile."""
        views: dict[Heartbeat, SlotView] = {}
        ended: list[Heartbeat] = []
        outcomes: list[Outcome] = []
        try:
            if self._fence is not None:
                self._fence.read([b.hb for b in entries], views)
            with self._lock:
                sent = self._clock()
                send = self._confirm(entries, views, sent, ended)
            if send:
                answers = self._sender.send(
                    queue_url, [(b.hb.receipt_handle, b.asked) for b in send]
                )
                with self._lock:
                    answered = self._clock()
                    for beat, answer in zip(send, answers, strict=True):
                        outcomes.append(
                            self._apply(beat.hb, sent, beat.asked, answer, answered, manual=False)
                        )
        finally:
            if self._fence is not None:
                self._fence.finish(views.values())
        for hb in ended:
            self._say_ended(hb, hb.beats)
        for s in outcomes:
            self._tell(s)

    def _confirm(
        self,
        entries: list[_Beat],
        views: dict[Heartbeat, SlotView],
        now: float,
        ended: list[Heartbeat],
    ) -> list[_Ask]:
        """Under the lock, just before the call: the entries still to send, with the
        visibility each asks for. The others are no longer in flight; those that ended
        (stopped meanwhile, their task ended, a limit) go to *ended* when this call
        dropped them from the registry."""
        send: list[_Ask] = []
        for beat in entries:
            hb, view = beat.hb, views.get(beat.hb)
            asked = None
            if hb.ended is None and (view is None or hb.follow(view, now)):
                asked = hb.plan(now) if hb.next_due <= beat.until else None
            if asked is not None:
                send.append(_Ask(hb, asked))
                continue
            hb.in_flight = False
            if hb.ended is not None and self._drop(hb):
                ended.append(hb)
            self._note_due(hb)
        self._answered.notify_all()
        return send
