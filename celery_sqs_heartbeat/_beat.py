"""The beat process: the beats of a threads, solo, gevent or eventlet worker come from a
small process of the worker's own that runs no task.

This module holds the worker's side (:class:`BeatProcess` and its link thread) and the
beat process's own life (:func:`_serve`); the keeper between them is ``_keeper``.
How the three fit, what each owns, and what heals what: ``docs/how-it-works.md``.
"""

from __future__ import annotations

import _socket
import collections
import contextlib
import functools
import logging
import math
import os
import pickle
import queue
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Collection
from typing import Any, NamedTuple

from . import _keeper, _system
from ._client import Clients
from ._heartbeat import Ended, Heartbeat, Settled
from ._report import STARTED, Counters, Reporter
from ._send import Answer, Sender
from ._settings import HeartbeatOptions
from ._sidecar import Sidecar
from ._slots import Slots

__all__ = ["BeatProcess", "supported", "warm_up"]

logger = logging.getLogger("celery_sqs_heartbeat")

#: How often the worker's link thread looks for messages Celery settled and hands on
#: what it was given, and how often the beat process ticks, in seconds.
LINK_POLL = _keeper.TICK
#: The largest packet either side reads.
MAX_PACKET = _keeper.MAX_PACKET
#: A keeper that dies sooner than this after its start is forked again only after this
#: long; :data:`~._keeper.MAX_QUICK_DEATHS` such deaths in a row, and the worker beats
#: in its own process.
RESPAWN_PAUSE = _keeper.RESPAWN_PAUSE
#: How long worker shutdown waits for the keeper to exit before it kills it.
EXIT_WAIT = 2.0
#: The worker's link thread's name.
LINK_THREAD = "celery-sqs-heartbeat-link"
#: The beat process's name in the worker's log lines (``%(processName)s``).
PROCESS_NAME = "HeartbeatProcess"
#: Messages handed back per question to the beat process: its answer (about 700 bytes
#: a message) must fit one packet of the socket's buffer (about 200 KB).
HAND_BACK_CHUNK = 100
#: How long the beat process tries to send an answer the worker has not room for yet.
ANSWER_WAIT = 5.0
_PICKLE = pickle.HIGHEST_PROTOCOL


def supported() -> bool:
    """Whether this platform can run a beat process (fork and packet sockets)."""
    return hasattr(os, "fork") and hasattr(socket, "SOCK_SEQPACKET")


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class _Config(NamedTuple):
    """What each beat process is forked with: the slots, how to make its SQS clients,
    its log level, the tasks' options resolved at the worker's start, and how long it
    may go without a tick."""

    slots: Slots
    make_clients: Callable[[], Clients]
    level: int
    options: dict[str, HeartbeatOptions]
    hang: float


class BeatProcess:
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
    ) -> None:
        self._slots = slots
        self._report = reporter
        self._clients = clients
        #: The options of each task resolved at the worker's start, which the beat
        #: process inherits: a message's options are sent only when they differ.
        self._options = options
        #: How long the keeper or a beat process may go without a tick.
        self.hang = _keeper.hang_limit(margin)
        #: Makes the sidecar of the worker's own process, given why it is needed.
        self._fallback = fallback
        #: That sidecar, once made: every message is beaten there from then on.
        self.local: Sidecar | None = None
        #: The keeper, what it shows without a packet (its tick, its beat process), and
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
        #: What any thread hands the link thread: ("add", fields, message, sent) for a
        #: message received (*sent*: the keeper's generation it was sent to, or False),
        #: ("ask", ident, command) for a question.
        self._inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        #: The link thread's own: every message the beat process beats, by receipt
        #: handle, with Celery's message and what the beat process was sent of it.
        self._held: dict[str, tuple[Any, tuple[Any, ...]]] = {}
        #: The link thread's own: commands the keeper has not read yet, (kind, packet).
        #: Not bounded: its adds are the held set's, and a keeper that does not read is
        #: killed within the hang limit.
        self._outbox: collections.deque[tuple[str, bytes]] = collections.deque()
        self._swept = 0.0
        #: Why the link thread killed the keeper.
        self._killed = ""
        #: Keepers in a row that died young, and why the keeper gave up (its last word).
        self._quick = 0
        self._gave_up = ""
        #: Questions to the beat process waiting for its answer.
        self._answers: dict[int, _Answer] = {}
        self._asked = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the worker's threads ------------------------------------------------------------

    def spawn(self, level: int | None = None) -> None:
        """Fork the keeper, which forks a beat process that logs at *level* (raises
        ``OSError`` where that fails)."""
        if level is not None:
            self._level = level
        self._retire()
        commands, theirs_commands = _pair()
        try:
            reports, theirs_reports = _pair()
        except OSError:
            commands.close()
            theirs_commands.close()
            raise
        config = _Config(self._slots, self._clients, self._level, self._options, self.hang)
        setup = _keeper.Setup(
            theirs_commands,
            theirs_reports,
            self._watch,
            self.hang,
            functools.partial(_serve, config),
        )
        # No keeper lives now: its watch starts fresh, so a new one that is slow to
        # turn the first time is given the hang limit from here, not from the last tick
        # of the one before.
        self._watch.fields.tick = time.monotonic()
        try:
            pid = os.fork()
        except OSError:
            for sock in (commands, theirs_commands, reports, theirs_reports):
                sock.close()
            raise
        if pid == 0:  # the keeper: it never returns to Celery
            try:
                commands.close()
                reports.close()
                _keeper.keep(setup)
            finally:
                os._exit(1)
        theirs_commands.close()
        theirs_reports.close()
        reports.settimeout(LINK_POLL)
        self._reports, self.keeper = reports, pid
        self._commands = _keeper.raw(commands)
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
        """The beat process, as its keeper last said (0: none now)."""
        return self._watch.beat

    def start(self) -> None:
        """Start the link thread that feeds the keeper and reads the reports."""
        self._thread = threading.Thread(target=self._link, name=LINK_THREAD, daemon=True)
        self._thread.start()

    def add(self, hb: Heartbeat, message: Any, *, known: bool = False) -> None:
        """Beat *hb*'s message from its receipt (``task_received``, the consumer's thread).
        *known*: its options are its task's resolved at the worker's start.

        Sent at once, before its task can start (which may then starve every other
        thread of this process), and never waiting: what does not fit now the link
        thread sends later."""
        fields = (
            hb.receipt_handle,
            hb.queue_url,
            None if known else hb.options,
            hb.received,
            hb.task_name,
            hb.task_id,
        )
        if self._dead:
            return  # said at ERROR: nothing beats any more
        self._report.counters.add(STARTED)  # here: whichever process beats it, and when
        generation = self._generation
        sent = self.local is None and _keeper.send(
            self._commands, pickle.dumps(("add", *fields), _PICKLE)
        )
        self._inbox.put(("add", fields, message, sent and generation))

    def holds(self, receipt_handle: str) -> bool:
        """Whether this worker's beats cover the message (as the link thread last knew)."""
        local = self.local
        if local is not None:
            return local.get(receipt_handle) is not None
        return receipt_handle in self._held

    def ask(self, command: tuple[Any, ...], timeout: float) -> Any:
        """Have the beat process run *command* (``hand_back``, ``stop_all``) and wait
        for its answer, at most *timeout* s (None: none came)."""
        local = self.local
        if local is not None:
            return _run(local, command[0], command[1:])
        if self._stopping.is_set() or self._commands is None:
            return None
        self._asked += 1
        ident, answer = self._asked, _Answer()
        self._answers[ident] = answer
        self._inbox.put(("ask", ident, command))
        answer.done.wait(timeout)
        self._answers.pop(ident, None)
        return answer.value

    def hand_back(self, receipt_handles: Collection[str], timeout: float) -> list[Any]:
        """Have the beat process hand these messages back (``Sidecar.hand_back``), in
        questions whose answers fit a packet each, all within *timeout* s."""
        handles = list(receipt_handles)
        answers: list[Any] = []
        deadline = time.monotonic() + timeout  # one for the whole drain
        for i in range(0, len(handles), HAND_BACK_CHUNK):
            chunk = handles[i : i + HAND_BACK_CHUNK]
            answer = self.ask(("hand_back", chunk), max(0.0, deadline - time.monotonic()))
            if answer is None:
                logger.warning(
                    "celery-sqs-heartbeat: the beat process did not hand back %d waiting "
                    "messages within %g s; each comes back when its visibility runs out.",
                    len(handles) - i,
                    timeout,
                )
                break
            answers += answer
        return answers

    def close(self) -> None:
        """Stop the beat process and the link thread (worker shutdown)."""
        self._stopping.set()
        commands, self._commands = self._commands, None
        if commands is not None:
            commands.close()  # the keeper's end-of-file, and so the beat process's
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(EXIT_WAIT)
        if self.keeper and not _system.reaped(self.keeper, EXIT_WAIT):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.keeper, signal.SIGKILL)  # and so the beat process (pdeathsig)
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
            packet: bytes | None = reports.recv(MAX_PACKET)
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
            self._on_report(pickle.loads(packet))
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
            if item[0] == "ask":
                _, ident, command = item
                if self.local is None:
                    self._queue("ask", pickle.dumps(("ask", ident, *command), _PICKLE))
                elif (answer := self._answers.get(ident)) is not None:
                    answer.set(_run(self.local, command[0], command[1:]))  # asked before
                continue
            _, fields, message, sent = item
            if self.local is not None:
                self.local.add(self._heartbeat(fields, message), counted=False, told=True)
                continue
            self._held[fields[0]] = (message, fields)
            if sent != self._generation:  # not sent, or to a keeper gone since
                self._queue("add", pickle.dumps(("add", *fields), _PICKLE))

    def _queue(self, kind: str, packet: bytes) -> None:
        self._outbox.append((kind, packet))

    def _flush(self) -> None:
        """Hand the keeper what waits, as much as fits now (never waiting for it)."""
        while self._outbox and _keeper.send(self._commands, self._outbox[0][1]):
            self._outbox.popleft()

    def _sweep(self) -> None:
        """Tell the beat process of each message Celery settled (acknowledged, rejected,
        requeued) whose heartbeat still runs there."""
        self._swept = time.monotonic()
        settled = [rh for rh, (message, _) in self._held.items() if message.acknowledged]
        for receipt_handle in settled:
            del self._held[receipt_handle]
            self._queue("settled", pickle.dumps(("settled", receipt_handle), _PICKLE))

    def _on_report(self, report: tuple[Any, ...]) -> None:
        kind = report[0]
        if kind == "settled":
            self._report.settled(report[1])
        elif kind == "ended":
            _, hb, beats, detail = report
            message, _ = self._held.pop(hb.receipt_handle, (None, ()))
            if hb.ended is Ended.GONE and (message is None or message.acknowledged):
                # A copy: Celery settled the message as the beat went out (or before:
                # the sweep, which only drops settled messages, had dropped it).
                hb.ended = Ended.SETTLED
            self._report.ended(hb, beats, detail)
        elif kind == "log":
            record = logging.makeLogRecord(report[1])
            if logger.isEnabledFor(record.levelno):
                logger.handle(record)
        elif kind == "started":
            self._started(*report[1:])
        elif kind == "answer":
            answer = self._answers.get(report[1])
            if answer is not None:
                answer.set(report[2])
        elif kind == "gave_up":
            self._gave_up = report[1]
        elif kind == "dropped":
            logger.warning(
                "celery-sqs-heartbeat: the worker was too busy to read %d reports of its beat "
                "process in time; their signals, counters and log lines are missing (the "
                "beats were sent).",
                report[1],
            )

    def _started(self, pid: int, old: int, status: str, paused: float, held: int) -> None:
        """The keeper forked beat process *pid*; in place of *old*, which died or hung,
        and handed it the *held* messages itself."""
        if not old:
            logger.info(
                "celery-sqs-heartbeat: the beats come from the worker's beat process "
                "(pid %d), which runs no task.",
                pid,
            )
            return
        logger.warning(
            "celery-sqs-heartbeat: the beat process (pid %d) %s; beats were paused for "
            "%.1f s. A new one (pid %d) beats the messages this worker holds (%d).",
            old,
            status,
            paused,
            pid,
            held,
        )

    def _replace(self) -> None:
        """The keeper died (and so the beat process): fork another and hand it every
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
        asks = [entry for entry in self._outbox if entry[0] == "ask"]
        self._outbox.clear()
        lived = time.monotonic() - self._spawned_at
        self._quick = self._quick + 1 if lived < _keeper.QUICK_DEATH else 0
        why = f"the beat process's keeper (pid {old}) {how}"
        if code is not None and os.WIFEXITED(code) and os.WEXITSTATUS(code) == _keeper.GAVE_UP:
            return self.fall_back(f"the beat process's keeper (pid {old}) gave up: {self._gave_up}")
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
            "celery-sqs-heartbeat: the beat process's keeper (pid %d) %s; a new one (pid "
            "%d) starts a beat process for the messages this worker holds (%d).",
            old,
            how,
            self.keeper,
            len(self._held),
        )
        for _, fields in self._held.values():
            self._queue("add", pickle.dumps(("add", *fields), _PICKLE))
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
        self._slots.forget_in_flight()  # the beat process died with its beats in flight
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
        for message, fields in self._held.values():
            local.add(self._heartbeat(fields, message), counted=False, told=True)
        self._held.clear()
        self.local = local
        self._take_inbox()

    def _heartbeat(self, fields: tuple[Any, ...], message: Any) -> Heartbeat:
        """The heartbeat of the worker's own process for a message it received."""
        rh, queue_url, given, received, task_name, task_id = fields
        return Heartbeat(
            rh,
            queue_url,
            given or self._options[task_name],
            received,
            task_name,
            task_id,
            lambda: bool(message.acknowledged),
        )


class _Answer:
    """A question's answer, set once by the link thread."""

    __slots__ = ("done", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None

    def set(self, value: Any) -> None:
        self.value = value
        self.done.set()


def _run(sidecar: Sidecar, question: str, args: tuple[Any, ...]) -> Any:
    """Run one of the worker's shutdown questions on *sidecar*."""
    if question == "hand_back":
        return sidecar.hand_back(args[0])
    if question == "stop_all":
        return sidecar.stop_all(args[0], keep=args[1])
    return None


# -- the beat process ------------------------------------------------------------------------


def _forward(sock: Any, report: tuple[Any, ...]) -> bool:
    """Hand *report* on without waiting (on a C library socket: a green one would
    wait); False if it does not fit now."""
    return _keeper.send(sock, pickle.dumps(report, _PICKLE))


class _Forwarder(Reporter):
    """The beat process's reporter: it hands every report to the worker, and tells the
    keeper of each heartbeat that ended (it holds that message no more)."""

    def __init__(self, counters: Counters, reports: Any, link: Any) -> None:
        super().__init__(counters, region=lambda: None)
        self._reports = reports
        self._link = link
        #: Reports dropped because the worker did not read them in time.
        self.dropped = 0

    def started(self, hb: Heartbeat) -> None:
        pass  # the worker reported it at task_received

    def settled(self, s: Settled) -> None:
        if s.answer.error is not None:
            s = _portable(s)
        self._forward(("settled", s))

    def ended(self, hb: Heartbeat, beats: int, detail: str = "") -> None:
        _forward(self._link, ("done", hb.receipt_handle))
        self._forward(("ended", hb, beats, detail))

    def _forward(self, report: tuple[Any, ...]) -> None:
        if not _forward(self._reports, report):
            self.dropped += 1
        elif self.dropped and _forward(self._reports, ("dropped", self.dropped)):
            self.dropped = 0


class BeatProcessError(Exception):
    """An unexpected error in the beat process, as its traceback."""


def _portable_answer(answer: Answer) -> Answer:
    """*answer* with its error as text: an exception may not survive pickling."""
    if answer.error is None:
        return answer
    text = "".join(traceback.format_exception(answer.error)).rstrip()
    return Answer(answer.failure, answer.detail, BeatProcessError(text))


def _portable(s: Settled) -> Settled:
    """*s* with its error as text."""
    answer = _portable_answer(s.answer)
    return Settled(
        s.hb,
        s.asked,
        answer,
        s.lateness,
        s.retry_in,
        s.beats,
        s.failures,
        s.manual,
        s.moot,
        s.ended,
    )


class _ForwardLogs(logging.Handler):
    """Hands the beat process's own log records to the worker, which logs them."""

    def __init__(self, reports: Any) -> None:
        super().__init__()
        self._reports = reports

    def emit(self, record: logging.LogRecord) -> None:
        fields = dict(record.__dict__)
        fields["msg"], fields["args"] = record.getMessage(), None
        fields["processName"] = PROCESS_NAME
        if record.exc_info:
            fields["exc_text"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        fields["exc_info"] = None
        _forward(self._reports, ("log", fields))


def _serve(config: _Config, link_fd: int, reports: Any) -> int:
    """The beat process's life: beat what the keeper hands on, and tick to it, until
    the keeper is gone. Returns its exit status.

    Every send is on a C library socket (*reports*, and the link's), which never waits:
    a green socket would wait on its hub until the worker reads, and stop the beats.
    Only the link's reads go through this thread's own (green) socket."""
    keeper = os.getppid()
    _system.die_with_parent()
    if os.getppid() != keeper:
        return 0
    link = _keeper.raw(_socket.socket(fileno=link_fd))
    logger.handlers[:] = [_ForwardLogs(reports)]
    logger.propagate = False
    if config.level:
        logger.setLevel(config.level)
    try:
        return _beat(config, link, reports, keeper)
    except Exception:
        logger.exception("celery-sqs-heartbeat: unexpected error in the beat process")
        return 1


def _beat(config: _Config, link: Any, reports: Any, keeper: int) -> int:
    slots, options = config.slots, config.options
    counters = Counters(*slots.counter_blocks(None, beat=True))
    slots.forget_in_flight()
    clients = config.make_clients()
    # Warmed up on a thread of its own: ticks go on meanwhile (STS may take seconds).
    threading.Thread(
        target=warm_up, args=(clients,), name=f"{LINK_THREAD}-warm", daemon=True
    ).start()
    sidecar = Sidecar(
        Sender(clients.for_queue),
        _Forwarder(counters, reports, link),
        call_timeout=clients.timeout,
        fence=slots,
        wake_every=config.hang / 2,  # a loop that stopped is noticed within the margin
    )
    sidecar.run_in_background()
    commands = socket.socket(fileno=os.dup(link.fileno()))  # a green one waits on this hub
    commands.settimeout(LINK_POLL)
    ticked = 0.0
    while True:
        try:
            packet: bytes | None = commands.recv(MAX_PACKET)
        except TimeoutError:
            packet = None
        except OSError:
            break
        if packet == b"":
            break  # the keeper closed its end (the worker's shutdown), or died
        if packet:
            _obey(sidecar, reports, options, pickle.loads(packet))
        now = time.monotonic()
        if now - ticked >= LINK_POLL:
            if os.getppid() != keeper:
                break
            if sidecar.healthy(now):  # a loop that stopped turning earns no tick
                ticked = now
                _forward(link, ("tick",))
    sidecar.shutdown(EXIT_WAIT)
    return 0


def warm_up(clients: Clients, who: str = "the beat process") -> None:
    """Make *clients*' client now, before any beat; where it cannot be made yet (STS or
    the instance's metadata briefly out of reach), say so: each beat tries again."""
    try:
        clients.warm_up()
    except Exception:
        logger.warning(
            "celery-sqs-heartbeat: %s could not make its SQS client yet; each beat tries again.",
            who,
            exc_info=True,
        )


def _obey(
    sidecar: Sidecar,
    reports: Any,
    options: dict[str, HeartbeatOptions],
    command: tuple[Any, ...],
) -> None:
    kind = command[0]
    if kind == "add":  # counted by the worker as it received the message
        rh, queue_url, given, received, task_name, task_id = command[1:]
        hb = Heartbeat(rh, queue_url, given or options[task_name], received, task_name, task_id)
        sidecar.add(hb, counted=False)
    elif kind == "settled":
        sidecar.stop(command[1], Ended.SETTLED)
    elif kind == "ask":
        # On a thread of its own: a hand-back makes SQS calls, and the ticks go on.
        threading.Thread(
            target=_answer,
            args=(sidecar, reports, command[1], command[2], command[3:]),
            name=f"{LINK_THREAD}-answer",
            daemon=True,
        ).start()


def _answer(
    sidecar: Sidecar, reports: Any, ident: int, question: str, args: tuple[Any, ...]
) -> None:
    """Run one of the worker's questions at its shutdown, and send the answer: the
    worker's main thread waits for it, so a full buffer is waited out a little."""
    answer = _run(sidecar, question, args)
    if question == "hand_back":
        answer = [(hb, _portable_answer(a)) for hb, a in answer]
    deadline = time.monotonic() + ANSWER_WAIT
    while not _forward(reports, ("answer", ident, answer)) and time.monotonic() < deadline:
        time.sleep(LINK_POLL / 10)
