"""The worker's side of the heartbeat process: it forks the keeper, feeds it what the worker
receives, reads the reports, watches the keeper, and replaces it.

Where no keeper can be kept it beats from the worker's own process instead, and says
so. It owns the held set of the worker (every message the heartbeat process beats, with
Celery's message) and the worker's ends of the sockets. How the three processes fit,
and what heals what: ``docs/how-it-works.md``.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import math
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import Future
from concurrent.futures import TimeoutError as NoAnswer
from typing import Any, NamedTuple

from .. import _system
from .._client import Clients
from .._heartbeat import Ended, Heartbeat
from .._loss import reason_of
from .._report import STARTED, Reporter
from .._send import Answer
from .._settings import HeartbeatOptions
from .._sidecar import Sidecar
from .._slots import Slots
from . import keeper as _keeper
from . import wire
from .serve import Config, ask, serve

__all__ = ["HeartbeatProcess", "supported"]

logger = logging.getLogger("celery_sqs_heartbeat")

#: How often the worker's link thread looks for messages Celery settled and hands on
#: what it was given, in seconds.
LINK_POLL = _keeper.TICK
#: A keeper that dies sooner than this after its start is forked again only after this
#: long; :data:`~.keeper.MAX_QUICK_DEATHS` such deaths in a row, and the worker beats
#: in its own process.
RESPAWN_PAUSE = _keeper.RESPAWN_PAUSE
#: How long worker shutdown waits for the keeper to exit before it kills it.
EXIT_WAIT = 2.0
#: The worker's link thread's name.
LINK_THREAD = "celery-sqs-heartbeat-link"
#: Messages handed back per question to the heartbeat process: its answer (about 700 bytes
#: a message) must fit one packet of the socket's buffer (about 200 KB).
HAND_BACK_CHUNK = 100
#: How long the shutdown's drain waits in all for the heartbeat process to hand messages back,
#: and again to end their heartbeats: a few client time-outs.
ASK_TIMEOUT = 15.0


class _Received(NamedTuple):
    """A message received, on its way to the link thread: its add, Celery's message,
    and the keeper's generation it was sent to at once (0: not sent)."""

    add: wire.Add
    message: Any
    sent: int


class _Asked(NamedTuple):
    """A question on its way to the link thread."""

    ask: wire.Ask


def supported() -> bool:
    """Whether this platform can run a heartbeat process (fork and packet sockets)."""
    return hasattr(os, "fork") and hasattr(socket, "SOCK_SEQPACKET")


class HeartbeatProcess:
    """The worker's side: it forks the keeper, feeds it, watches it, and replaces it;
    where no keeper can be kept, it beats from the worker's own process (*fallback*)."""

    def __init__(
        self,
        slots: Slots,
        reporter: Reporter,
        clients: Callable[[], Clients],
        options: dict[str, HeartbeatOptions],
        *,
        margin: float = math.inf,
        fallback: Callable[[str], Sidecar] | None = None,
        on_lost: Callable[[Heartbeat], None] | None = None,
    ) -> None:
        self._slots = slots
        self._report = reporter
        self._clients = clients
        #: The options of each task resolved at the worker's start, which the heartbeat
        #: process inherits: a message's options are sent only when they differ.
        self._options = options
        #: How long the keeper or a heartbeat process may go without a tick.
        self.hang = _keeper.hang_limit(margin)
        #: Makes the sidecar of the worker's own process, given why it is needed.
        self._fallback = fallback
        #: Told of each heartbeat the heartbeat process ended with its message lost.
        self._on_lost = on_lost
        #: That sidecar, once made: every message is beaten there from then on.
        self.local: Sidecar | None = None
        #: The keeper, what it shows without a packet (its tick, its heartbeat process), and
        #: the worker's ends of their socket pairs (commands: the C library's socket,
        #: so a send never waits), and those of keepers gone (:meth:`_retire`).
        self.keeper = 0
        self._watch = _keeper.Watch()
        self._retired: list[Any] = []
        #: Bumped by each keeper: an add sent to an older one is sent again.
        self._generation = 0
        #: Nothing beats any more (no fallback could be made): said, and nothing is kept.
        self._dead = False
        #: A green worker cannot fork safely once its greenlets run (see _replace).
        self.green = False
        self._commands: Any = None
        self._reports: socket.socket | None = None
        self._spawned_at = 0.0
        self._level = logging.NOTSET
        #: What any thread hands the link thread: a message received, or a question.
        self._inbox: queue.SimpleQueue[_Received | _Asked] = queue.SimpleQueue()
        #: The link thread's own: every message the heartbeat process beats, by receipt
        #: handle, with Celery's message and the add the heartbeat process was sent of it.
        self._held: dict[str, tuple[Any, wire.Add]] = {}
        #: The link thread's own: commands the keeper has not read yet, (a question?,
        #: packet). Not bounded: its adds are the held set's, and a keeper that does not
        #: read is killed within the hang limit.
        self._outbox: collections.deque[tuple[bool, bytes]] = collections.deque()
        self._swept = 0.0
        #: Why the link thread killed the keeper.
        self._killed = ""
        #: Keepers in a row that died young, and why the keeper gave up (its last word).
        self._quick = 0
        self._gave_up = ""
        #: Questions to the heartbeat process waiting for its answer.
        self._answers: dict[int, Future[Any]] = {}
        self._asked = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the worker's threads ------------------------------------------------------------

    def spawn(self, level: int | None = None) -> None:
        """Fork the keeper, which forks a heartbeat process that logs at *level* (raises
        ``OSError`` where that fails)."""
        if level is not None:
            self._level = level
        self._retire()
        config = Config(
            self._slots, self._clients, self._level, self._options, self.hang, os.getpid()
        )
        # No keeper lives now: its watch starts fresh, so a new one that is slow to
        # turn the first time is given the hang limit from here, not from the last tick
        # of the one before.
        self._watch.fields.tick = time.monotonic()
        pid, commands, reports = _keeper.fork(
            self._watch, self.hang, functools.partial(serve, config)
        )
        reports.settimeout(LINK_POLL)
        self._reports, self.keeper = reports, pid
        self._commands = wire.raw(commands)
        self._generation += 1  # after the new socket: see _take_inbox
        self._spawned_at = time.monotonic()

    def _retire(self) -> None:
        """Set aside the sockets of a keeper that is gone. They are closed only at the
        next replacement: a thread may still be in a send on one, and a number closed
        now could be a new socket's at once."""
        for sock in self._retired:
            sock.close()
        self._retired = [s for s in (self._commands, self._reports) if s is not None]
        self._commands = self._reports = None

    @property
    def pid(self) -> int:
        """The heartbeat process, as its keeper last said (0: none now)."""
        return self._watch.beat

    def start(self) -> None:
        """Start the link thread that feeds the keeper and reads the reports."""
        self._thread = threading.Thread(target=self._link, name=LINK_THREAD, daemon=True)
        self._thread.start()

    def add(self, hb: Heartbeat, message: Any) -> None:
        """Beat *hb*'s message from its receipt (``task_received``, the consumer's thread).

        Sent at once, before its task can start (which may then starve every other
        thread of this process), and never waiting: what does not fit now the link
        thread sends later."""
        if self._dead:
            return  # said at ERROR: nothing beats any more
        known = hb.options is self._options.get(hb.task_name)
        add = wire.Add(
            hb.receipt_handle,
            hb.queue_url,
            None if known else hb.options,
            hb.received,
            hb.task_name,
            hb.task_id,
        )
        self._report.started(hb)
        self._report.counters.add(STARTED)  # here: whichever process beats it, and when
        generation = self._generation
        sent = self.local is None and wire.send(self._commands, add)
        self._inbox.put(_Received(add, message, generation if sent else 0))

    def holds(self, receipt_handle: str) -> bool:
        """Whether this worker's beats cover the message (as the link thread last knew)."""
        local = self.local
        if local is not None:
            return local.get(receipt_handle) is not None
        return receipt_handle in self._held

    def ask(self, question: wire.Question, timeout: float) -> Any:
        """Have the heartbeat process answer *question* and wait for its answer, at most
        *timeout* s (None: none came)."""
        local = self.local
        if local is not None:
            return ask(local, question)
        if self._stopping.is_set() or self._commands is None:
            return None
        self._asked += 1
        ident, answer = self._asked, Future[Any]()
        self._answers[ident] = answer
        self._inbox.put(_Asked(wire.Ask(ident, question)))
        try:
            return answer.result(timeout)
        except NoAnswer:
            return None
        finally:
            self._answers.pop(ident, None)

    def hand_back(
        self, receipt_handles: Collection[str], timeout: float = ASK_TIMEOUT
    ) -> list[tuple[Heartbeat, Answer]]:
        """Have the heartbeat process hand these messages back (``Sidecar.hand_back``), in
        questions whose answers fit a packet each, all within *timeout* s."""
        handles = list(receipt_handles)
        answers: list[tuple[Heartbeat, Answer]] = []
        deadline = time.monotonic() + timeout  # one for the whole drain
        for i in range(0, len(handles), HAND_BACK_CHUNK):
            chunk = handles[i : i + HAND_BACK_CHUNK]
            answer = self.ask(wire.HandBack(chunk), max(0.0, deadline - time.monotonic()))
            if answer is None:
                logger.warning(
                    "celery-sqs-heartbeat: the heartbeat process did not hand back %d waiting "
                    "messages within %g s; each comes back when its visibility runs out.",
                    len(handles) - i,
                    timeout,
                )
                break
            answers += answer
        return answers

    def stop_all(self, reason: Ended, keep: Collection[str]) -> int:
        """End every heartbeat the heartbeat process beats but those of *keep*."""
        return int(self.ask(wire.StopAll(reason, frozenset(keep)), ASK_TIMEOUT) or 0)

    def close(self) -> None:
        """Stop the heartbeat process and the link thread (worker shutdown)."""
        self._stopping.set()
        commands, self._commands = self._commands, None
        if commands is not None:
            commands.close()  # the keeper's end-of-file, and so the heartbeat process's
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(EXIT_WAIT)
        if self.keeper and not _system.reaped(self.keeper, EXIT_WAIT):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.keeper, signal.SIGKILL)  # and so the heartbeat process (pdeathsig)
            _system.reaped(self.keeper, EXIT_WAIT)
        _system.reap_orphan(self.pid, self._watch.beat_start, EXIT_WAIT)
        self.keeper = 0
        self._retire()
        self._retire()  # and close them now: nothing sends any more
        local, self.local = self.local, None
        if local is not None:
            local.shutdown(EXIT_WAIT)

    # -- the link thread ---------------------------------------------------------------

    def _link(self) -> None:
        while not self._stopping.is_set():
            try:
                if self.local is None:
                    self._turn()
                else:
                    self._take_inbox()
                    self._stopping.wait(LINK_POLL)
            except Exception:  # pragma: no cover - a bug; keep the link alive
                logger.exception("celery-sqs-heartbeat: unexpected error in the beat link")
                self._stopping.wait(LINK_POLL)

    def _turn(self) -> None:
        reports = self._reports
        assert reports is not None
        try:
            packet: bytes | None = reports.recv(wire.MAX_PACKET)
        except TimeoutError:
            packet = None
        except OSError:
            packet = b""
        self._take_inbox()
        if packet == b"":
            if not self._stopping.is_set():
                self._replace()
            return
        if packet:
            self._on_report(wire.decode(packet))
        silent = self._watch.silent_for(time.monotonic())
        if silent > self.hang and self.keeper and not self._killed:
            # The keeper turns five times a second, whatever this process does: it stopped.
            self._killed = f"stopped ticking for {silent:.1f} s and was killed"
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.keeper, signal.SIGKILL)  # its end-of-file replaces it
        if time.monotonic() >= self._swept + LINK_POLL:
            self._sweep()
        self._flush()

    def _take_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Asked):
                if self.local is None:
                    self._outbox.append((True, wire.encode(item.ask)))
                elif (answer := self._answers.get(item.ask.ident)) is not None:
                    answer.set_result(ask(self.local, item.ask.question))  # asked before
                continue
            add, message, sent = item
            if self.local is not None:
                self.local.add(
                    add.heartbeat(self._options, _acked(message)), counted=False, told=True
                )
                continue
            self._held[add.receipt_handle] = (message, add)
            if sent != self._generation:  # not sent, or to a keeper gone since
                self._outbox.append((False, wire.encode(add)))

    def _flush(self) -> None:
        """Hand the keeper what waits, as much as fits now (never waiting for it)."""
        while self._outbox and wire.send(self._commands, self._outbox[0][1]):
            self._outbox.popleft()

    def _sweep(self) -> None:
        """Tell the heartbeat process of each message Celery settled (acknowledged, rejected,
        requeued) whose heartbeat still runs there."""
        self._swept = time.monotonic()
        settled = [rh for rh, (message, _) in self._held.items() if message.acknowledged]
        for receipt_handle in settled:
            del self._held[receipt_handle]
            self._outbox.append((False, wire.encode(wire.Acked(receipt_handle))))

    def _on_report(self, report: wire.Message) -> None:
        if isinstance(report, wire.Answered):
            self._report.outcome(report.outcome)
        elif isinstance(report, wire.HeartbeatEnded):
            hb = report.hb
            message, _ = self._held.pop(hb.receipt_handle, (None, None))
            if hb.ended is Ended.GONE and (message is None or message.acknowledged):
                # A copy: Celery settled the message as the beat went out (or before:
                # the sweep, which only drops settled messages, had dropped it).
                hb.ended = Ended.SETTLED
            self._report.ended(hb, report.beats, report.detail)
            if self._on_lost is not None and reason_of(hb.ended) is not None:
                self._on_lost(hb)
        elif isinstance(report, wire.Log):
            record = logging.makeLogRecord(report.fields)
            if logger.isEnabledFor(record.levelno):
                logger.handle(record)
        elif isinstance(report, wire.Started):
            self._started(report)
        elif isinstance(report, wire.Reply):
            answer = self._answers.get(report.ident)
            if answer is not None and not answer.done():
                answer.set_result(report.value)
        elif isinstance(report, wire.GaveUp):
            self._gave_up = report.why
        elif isinstance(report, wire.Dropped):
            logger.warning(
                "celery-sqs-heartbeat: the worker was too busy to read %d reports of its heartbeat "
                "process in time; their signals, counters and log lines are missing (the "
                "beats were sent).",
                report.reports,
            )

    def _started(self, started: wire.Started) -> None:
        """The keeper forked a heartbeat process; in place of an old one, which died or hung,
        and handed it the held messages itself."""
        pid, old, status, paused, held = started
        if not old:
            logger.info(
                "celery-sqs-heartbeat: the beats come from the worker's heartbeat process "
                "(pid %d), which runs no task.",
                pid,
            )
            return
        logger.warning(
            "celery-sqs-heartbeat: the heartbeat process (pid %d) %s; beats were paused for "
            "%.1f s. A new one (pid %d) beats the messages this worker holds (%d).",
            old,
            status,
            paused,
            pid,
            held,
        )

    def _replace(self) -> None:
        """The keeper died (and so the heartbeat process): fork another and hand it every
        message, unless that cannot be done; then the worker beats them itself."""
        old = self.keeper
        with contextlib.suppress(ProcessLookupError):  # an end-of-file that was an error
            os.kill(old, signal.SIGKILL)
        code = _system.reap(old)
        _system.reap_orphan(
            self.pid, self._watch.beat_start, EXIT_WAIT
        )  # a worker that is PID 1 inherits it
        how = self._killed or (_system.status(code) if code is not None else "exited")
        self._killed = ""
        self._take_inbox()
        # Every held message is handed over below; the questions wait for the new one.
        asks = [entry for entry in self._outbox if entry[0]]
        self._outbox.clear()
        lived = time.monotonic() - self._spawned_at
        self._quick = self._quick + 1 if lived < _keeper.QUICK_DEATH else 0
        why = f"the heartbeat process's keeper (pid {old}) {how}"
        if code is not None and os.WIFEXITED(code) and os.WEXITSTATUS(code) == _keeper.GAVE_UP:
            return self.fall_back(
                f"the heartbeat process's keeper (pid {old}) gave up: {self._gave_up}"
            )
        if self.green:
            return self.fall_back(f"{why}, and a green worker cannot fork once it runs")
        if self._quick >= _keeper.MAX_QUICK_DEATHS:
            return self.fall_back(f"{why}, the {self._quick}th in a row soon after its start")
        try:
            if self._stopping.wait(self._spawned_at + RESPAWN_PAUSE - time.monotonic()):
                return None  # the worker is shutting down
            self.spawn()
        except OSError as exc:
            return self.fall_back(f"{why}, and no new one could be forked ({exc})")
        logger.warning(
            "celery-sqs-heartbeat: the heartbeat process's keeper (pid %d) %s; a new one (pid "
            "%d) starts a heartbeat process for the messages this worker holds (%d).",
            old,
            how,
            self.keeper,
            len(self._held),
        )
        self._outbox.extend((False, wire.encode(add)) for _, add in self._held.values())
        self._outbox.extend(asks)
        self._flush()
        return None

    def fall_back(self, why: str) -> None:
        """From now on beat every message in the worker's own process (said at WARNING
        by *fallback*, with the margin), or, without one, say that nothing is beaten."""
        self._retire()
        self.keeper = 0
        if self._stopping.is_set():
            return  # the worker is shutting down: nothing to beat any more
        self._slots.forget_in_flight()  # the heartbeat process died with its beats in flight
        local = None
        if self._fallback is not None:
            try:
                local = self._fallback(why)
            except Exception:
                logger.exception(
                    "celery-sqs-heartbeat: %s, and the worker could not beat its messages itself",
                    why,
                )
        if local is None:
            logger.error(
                "celery-sqs-heartbeat: %s; the messages this worker holds (%d) are no "
                "longer beaten.",
                why,
                len(self._held),
            )
            self._dead = True
            self._stopping.set()
            self._held.clear()
            return
        for message, add in self._held.values():
            local.add(add.heartbeat(self._options, _acked(message)), counted=False, told=True)
        self._held.clear()
        self.local = local
        self._take_inbox()


def _acked(message: Any) -> Callable[[], bool]:
    """Whether Celery acknowledged (rejected, requeued) *message*, for a heartbeat of
    the worker's own process."""
    return lambda: bool(message.acknowledged)
