"""The beat process: the beats of a threads, solo, gevent or eventlet worker come from a
small process of the worker's own that runs no task.

In these pools the tasks run in the worker's main process, so a heartbeat thread there
shares their interpreter: a task stuck in one C call that holds the GIL, or a greenlet
that never yields, would starve it. At ``worker_ready``, once kombu has connected and
before the pool starts a thread (the worker's only thread is its main thread then), the
worker forks a process that runs only a sidecar (``_sidecar``), as a prefork worker's
main process does for its children. The fork shares the loaded modules and kombu's
parsed SQS models copy-on-write, and ``gc.freeze()`` in the child keeps its collector
from writing to (and so copying) them.

Between the two processes:

* Two socket pairs of packets (``SOCK_SEQPACKET``), one per direction. A ``send`` is one
  whole packet, so any thread sends without a lock, and the end of either process is an
  end-of-file for the other. The worker sends each message it receives (``add``) and
  each message Celery settled before its task ended there (``settled``).
  The beat process sends back what its sidecar reports (``settled``, ``ended``) and its
  own log records: the worker counts, signals and logs them itself, so receivers, log
  lines and :func:`~celery_sqs_heartbeat.stats` stay in the worker. A worker too busy
  to read (a task holding the GIL) never holds up a beat: reports that do not fit the
  socket's buffer are dropped, and the worker says how many.
* The slots of ``_slots``, mapped before the fork: the task's thread or greenlet writes
  one at ``task_prerun`` and ``task_postrun``, as a prefork pool child does, so
  ``task_postrun`` stays final.

The worker's child is a *keeper*, which forks the beat process and forks another at
once if it dies (the worker's link thread then hands the new one every message it still
holds). So each beat process is a fork of the quiet worker at ``worker_ready``, not of a
worker running tasks (whose other threads may hold locks the fork copies, and whose
greenlets the fork copies too). Only a keeper that dies is forked again from the busy
worker, in a threads or solo worker; a green worker then stops beating, and says so. Both
die with the worker: the beat process at the end-of-file, and on Linux both at once
(``PR_SET_PDEATHSIG``) when their parent is SIGKILLed. They ignore SIGTERM, SIGINT and
SIGQUIT, so a signal sent to the whole group (systemd's default) leaves the worker's
drain its beats.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import pickle
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, NamedTuple

from ._client import Clients
from ._heartbeat import Ended, Heartbeat, Settled
from ._report import Counters, Reporter
from ._send import Answer, Sender
from ._settings import HeartbeatOptions
from ._sidecar import Sidecar
from ._slots import Slots

__all__ = ["BeatProcess", "supported"]

logger = logging.getLogger("celery_sqs_heartbeat")

#: How often the worker's link thread looks for messages Celery settled, and how often
#: the beat process makes sure its worker is still there, in seconds.
LINK_POLL = 0.2
#: The largest packet either side reads: a message's receipt handle and queue URL, or a
#: log record with its traceback, fit many times over.
MAX_PACKET = 1 << 20
#: A beat process (or keeper) that dies sooner than this after its start is forked again
#: only after this long, so one that dies at once does not fork in a loop.
RESPAWN_PAUSE = 1.0
#: How long worker shutdown waits for the beat process to exit before it kills it.
EXIT_WAIT = 2.0
#: The worker's link thread's name.
LINK_THREAD = "celery-sqs-heartbeat-link"
#: The beat process's name in the worker's log lines (``%(processName)s``).
PROCESS_NAME = "HeartbeatProcess"
#: The signals the keeper and the beat process ignore: the stops of the whole group
#: (systemd's default), and the ones Celery handles in the worker (SIGHUP restarts it).
IGNORED_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2")
    if hasattr(signal, name)
)
#: ``prctl(PR_SET_PDEATHSIG, ...)``: Linux's number for it.
_PR_SET_PDEATHSIG = 1
_PICKLE = pickle.HIGHEST_PROTOCOL


def supported() -> bool:
    """Whether this platform can run a beat process (fork and packet sockets)."""
    return hasattr(os, "fork") and hasattr(socket, "SOCK_SEQPACKET")


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class BeatProcess:
    """The worker's side: it forks the beat process, feeds it, and replaces it."""

    def __init__(
        self,
        slots: Slots,
        reporter: Reporter,
        clients: Callable[[], Clients],
        options: dict[str, HeartbeatOptions],
    ) -> None:
        self._slots = slots
        self._report = reporter
        self._clients = clients
        #: The options of each task resolved at the worker's start, which the beat
        #: process inherits: a message's options are sent only when they differ.
        self._options = options
        #: The keeper (the worker's child that forks the beat process, and forks it again
        #: if it dies), the beat process, and the worker's ends of their socket pairs.
        self.keeper = 0
        self.pid = 0
        #: A green worker cannot fork safely once its greenlets run (see _replace).
        self.green = False
        self._commands: socket.socket | None = None
        self._reports: socket.socket | None = None
        #: Bumped by each new beat process: a message sent to an older one is sent again.
        self._generation = 0
        self._spawned_at = 0.0
        self._level = logging.NOTSET
        #: Messages received, on their way to the link thread: (what the beat process
        #: is sent of it, Celery's message, receipt handle, generation it was sent to).
        self._received: queue.SimpleQueue[tuple[tuple[Any, ...], Any, str, int]] = (
            queue.SimpleQueue()
        )
        #: The link thread's own: every message the beat process beats, by receipt
        #: handle, with Celery's message and what the beat process was sent of it.
        self._held: dict[str, tuple[Any, tuple[Any, ...]]] = {}
        self._swept = 0.0
        #: Questions to the beat process waiting for its answer: [answered, answer].
        self._answers: dict[int, list[Any]] = {}
        self._asked = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the worker's threads ------------------------------------------------------------

    def spawn(self, level: int | None = None) -> None:
        """Fork the keeper, which forks a beat process that logs at *level* (raises
        ``OSError`` where that fails); messages received before are sent to it (by the
        link thread)."""
        if level is not None:
            self._level = level
        for old in (self._commands, self._reports):  # a keeper's that died
            if old is not None:
                old.close()
        commands, theirs_commands = _pair()
        reports, theirs_reports = _pair()
        pid = os.fork()
        if pid == 0:  # the keeper: it never returns to Celery
            try:
                commands.close()
                reports.close()
                _keep(
                    _Setup(
                        theirs_commands,
                        theirs_reports,
                        self._slots,
                        self._clients,
                        self._level,
                        self._options,
                    )
                )
            finally:
                os._exit(0)
        theirs_commands.close()
        theirs_reports.close()
        reports.settimeout(LINK_POLL)
        self._reports, self.keeper, self.pid = reports, pid, 0
        self._commands = commands  # before the generation: see add()
        self._generation += 1
        self._spawned_at = time.monotonic()

    def start(self) -> None:
        """Start the link thread that reads the beat process's reports."""
        self._thread = threading.Thread(target=self._link, name=LINK_THREAD, daemon=True)
        self._thread.start()

    def add(self, hb: Heartbeat, message: Any, *, known: bool = False) -> None:
        """Beat *hb*'s message from its receipt (``task_received``, the consumer's thread).
        *known*: its options are its task's resolved at the worker's start."""
        fields = (
            hb.receipt_handle,
            hb.queue_url,
            None if known else hb.options,
            hb.received,
            hb.task_name,
            hb.task_id,
        )
        if self._stopping.is_set():
            return  # no beat process any more (said at ERROR): keep nothing
        generation, commands = self._generation, self._commands
        self._received.put((fields, message, hb.receipt_handle, generation))
        _send(commands, pickle.dumps(("add", *fields), _PICKLE))

    def holds(self, receipt_handle: str) -> bool:
        """Whether the beat process beats this message (as the link thread last knew)."""
        return receipt_handle in self._held

    def ask(self, command: tuple[Any, ...], timeout: float) -> Any:
        """Have the beat process run *command* (``hand_back``, ``stop_all``) and wait
        for its answer, at most *timeout* s (None: none came)."""
        if self._stopping.is_set() or self._commands is None:
            return None
        self._asked += 1
        ident, done = self._asked, threading.Event()
        self._answers[ident] = [done, None]
        _send(self._commands, pickle.dumps(("ask", ident, *command), _PICKLE))
        done.wait(timeout)
        return self._answers.pop(ident)[1]

    def close(self) -> None:
        """Stop the beat process and the link thread (worker shutdown)."""
        self._stopping.set()
        commands, self._commands = self._commands, None
        if commands is not None:
            commands.close()  # the beat process's end-of-file
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(EXIT_WAIT)
        if self.keeper and not _reaped(self.keeper, EXIT_WAIT):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.keeper, signal.SIGKILL)  # and so the beat process (pdeathsig)
            _reaped(self.keeper, EXIT_WAIT)
        self.keeper = self.pid = 0

    # -- the link thread ---------------------------------------------------------------

    def _link(self) -> None:
        while not self._stopping.is_set():
            try:
                self._turn()
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
        self._take_received()
        if packet == b"":
            if not self._stopping.is_set():
                self._replace()
            return
        if packet:
            self._on_report(pickle.loads(packet))
        if time.monotonic() >= self._swept + LINK_POLL:
            self._sweep()

    def _take_received(self) -> None:
        while True:
            try:
                fields, message, receipt_handle, generation = self._received.get_nowait()
            except queue.Empty:
                return
            self._held[receipt_handle] = (message, fields)
            if generation != self._generation:  # sent before this beat process was made
                _send(self._commands, pickle.dumps(("add", *fields), _PICKLE))

    def _sweep(self) -> None:
        """Tell the beat process of each message Celery settled (acknowledged, rejected,
        requeued) whose heartbeat still runs there."""
        self._swept = time.monotonic()
        settled = [rh for rh, (message, _) in self._held.items() if message.acknowledged]
        for receipt_handle in settled:
            del self._held[receipt_handle]
            _send(self._commands, pickle.dumps(("settled", receipt_handle), _PICKLE))

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
            waiting = self._answers.get(report[1])
            if waiting is not None:
                waiting[1] = report[2]
                waiting[0].set()
        elif kind == "dropped":
            logger.warning(
                "celery-sqs-heartbeat: the worker was too busy to read %d reports of its beat "
                "process in time; their signals, counters and log lines are missing (the "
                "beats were sent).",
                report[1],
            )

    def _started(self, pid: int, old: int, status: str, paused: float) -> None:
        """The keeper forked beat process *pid*; in place of *old*, which died."""
        self.pid = pid
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
            len(self._held),
        )
        self._hand_over()

    def _hand_over(self) -> None:
        """Send a new beat process every message the worker holds."""
        for _, fields in self._held.values():
            _send(self._commands, pickle.dumps(("again", *fields), _PICKLE))

    def _replace(self) -> None:
        """The keeper died (and so the beat process): fork another, unless this is a
        green worker, whose fork would copy its running greenlets (a second consumer,
        the tasks) into the new process."""
        old, code = self.keeper, _reap(self.keeper)
        status = _status(code) if code is not None else "exited"
        self._take_received()
        try:
            if self.green:
                raise OSError("a green worker cannot fork once it runs")
            if self._stopping.wait(self._spawned_at + RESPAWN_PAUSE - time.monotonic()):
                return  # the worker is shutting down
            self.spawn()
        except OSError as exc:
            logger.error(
                "celery-sqs-heartbeat: the beat process's keeper (pid %d) %s and no new one "
                "could be started (%s); the messages this worker holds (%d) are no longer "
                "beaten.",
                old,
                status,
                exc,
                len(self._held),
            )
            self._stopping.set()
            return
        logger.warning(
            "celery-sqs-heartbeat: the beat process's keeper (pid %d) %s; a new one (pid "
            "%d) starts a beat process for the messages this worker holds (%d).",
            old,
            status,
            self.keeper,
            len(self._held),
        )
        self._hand_over()


def _send(sock: socket.socket | None, packet: bytes) -> None:
    """Send one packet; a beat process that is gone is the link thread's to replace."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.send(packet, socket.MSG_NOSIGNAL)


def _reaped(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return True
        if done:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def _reap(pid: int) -> int | None:
    """The wait status of child *pid*, reaped now (None: reaped already)."""
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return None


def _status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


# -- the beat process ------------------------------------------------------------------------


def _forward(reports: socket.socket, report: tuple[Any, ...]) -> bool:
    """Hand *report* to the worker without waiting; False if it does not fit now."""
    try:
        reports.send(pickle.dumps(report, _PICKLE), socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        pass  # the worker is gone; so is this process, soon
    return True


class _Forwarder(Reporter):
    """The beat process's reporter: it hands every report to the worker."""

    def __init__(self, counters: Counters, reports: socket.socket) -> None:
        super().__init__(counters, region=lambda: None)
        self._reports = reports
        #: Reports dropped because the worker did not read them in time.
        self.dropped = 0

    def started(self, hb: Heartbeat) -> None:
        pass  # the worker reported it at task_received

    def settled(self, s: Settled) -> None:
        if s.answer.error is not None:
            s = _portable(s)
        self._forward(("settled", s))

    def ended(self, hb: Heartbeat, beats: int, detail: str = "") -> None:
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

    def __init__(self, reports: socket.socket) -> None:
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


class _Setup(NamedTuple):
    """What the keeper hands each beat process: its ends of the two socket pairs, the
    slots, how to make its SQS clients, its log level, and the tasks' options."""

    commands: socket.socket
    reports: socket.socket
    slots: Slots
    make_clients: Callable[[], Clients]
    level: int
    options: dict[str, HeartbeatOptions]


def _keep(setup: _Setup) -> None:
    """The keeper's life: fork the beat process, and fork it again whenever it dies,
    until it exits of itself (the worker closed its end) or the worker is gone.

    The keeper is forked while the worker is still quiet (at ``worker_ready``: one
    thread, no greenlet running but the main one), and does nothing else: each beat
    process is a fork of that quiet state, never of a worker running tasks. Under
    gevent it runs on a hub of its own (:func:`_clean`), and waits with the system's own
    calls.
    """
    worker = os.getppid()
    for signum in IGNORED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    _die_with_parent()
    if os.getppid() != worker:
        return
    gc.freeze()  # the worker's objects stay shared: the collector no longer writes them
    fork, waitpid, sleep = (
        _original("os", "fork"),
        _original("os", "waitpid"),
        _original("time", "sleep"),
    )

    def keep(reports: socket.socket) -> int:
        old, status, died = 0, "", 0.0
        while True:
            started = time.monotonic()
            pid = fork()
            if pid == 0:
                code = 1  # what an exception leaves: not "the worker closed its end"
                try:
                    code = _clean(lambda: _serve(setup._replace(reports=reports)))
                finally:
                    os._exit(code)
            paused = started - died if old else 0.0
            with contextlib.suppress(OSError):
                reports.send(pickle.dumps(("started", pid, old, status, paused), _PICKLE))
            _, code = waitpid(pid, 0)
            if os.getppid() != worker:
                return 0
            if os.WIFEXITED(code) and os.WEXITSTATUS(code) == 0:
                return 0  # the worker closed its end
            old, status, died = pid, _status(code), time.monotonic()
            if died - started < RESPAWN_PAUSE:  # one that dies at once does not loop fast
                sleep(RESPAWN_PAUSE)

    os._exit(_clean(lambda: keep(_rewrap(setup.reports))))


def _serve(setup: _Setup) -> int:
    """The beat process's life: beat what the worker sends until the worker is gone.
    Returns its exit status."""
    slots, options = setup.slots, setup.options
    keeper = os.getppid()
    _die_with_parent()
    if os.getppid() != keeper:
        return 0
    commands, reports = _rewrap(setup.commands), _rewrap(setup.reports)
    logger.handlers[:] = [_ForwardLogs(reports)]
    logger.propagate = False
    if setup.level:
        logger.setLevel(setup.level)
    counters = Counters(*slots.counter_blocks(None, beat=True))
    slots.forget_in_flight()
    clients = setup.make_clients()
    try:
        clients.warm_up()
    except Exception:  # STS or the instance's metadata, briefly out of reach
        logger.warning(
            "celery-sqs-heartbeat: the beat process could not make its SQS client yet; "
            "each beat tries again.",
            exc_info=True,
        )
    sidecar = Sidecar(
        Sender(clients.for_queue),
        _Forwarder(counters, reports),
        call_timeout=clients.timeout,
        fence=slots,
    )
    sidecar.run_in_background()
    commands.settimeout(LINK_POLL)
    while True:
        try:
            packet = commands.recv(MAX_PACKET)
        except TimeoutError:
            if os.getppid() != keeper:
                break
            continue
        except OSError:
            break
        if not packet:
            break  # the worker closed its end, or died
        command = pickle.loads(packet)
        kind = command[0]
        if kind in ("add", "again"):  # "again": held by one that died, which counted it
            rh, queue_url, given, received, task_name, task_id = command[1:]
            hb = Heartbeat(rh, queue_url, given or options[task_name], received, task_name, task_id)
            sidecar.add(hb, counted=kind == "add")
        elif kind == "settled":
            sidecar.stop(command[1], Ended.SETTLED)
        elif kind == "ask":
            _answer(sidecar, reports, command[1], command[2], command[3:])
    sidecar.shutdown(EXIT_WAIT)
    return 0


def _answer(
    sidecar: Sidecar, reports: socket.socket, ident: int, question: str, args: tuple[Any, ...]
) -> None:
    """Run one of the worker's questions at its shutdown, and send the answer (waited
    for: the worker's main thread is waiting for it)."""
    answer: Any = None
    if question == "hand_back":
        answer = [(hb, _portable_answer(a)) for hb, a in sidecar.hand_back(args[0])]
    elif question == "stop_all":
        answer = sidecar.stop_all(args[0], keep=args[1])
    with contextlib.suppress(OSError):
        reports.send(pickle.dumps(("answer", ident, answer), _PICKLE))


def _die_with_parent() -> None:
    """On Linux, have the kernel SIGKILL this process the moment its parent dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # elsewhere: the end-of-file and the parent check


def _original(module: str, name: str) -> Any:
    """The system's own *module.name*, not gevent's (which waits on the worker's hub) or
    eventlet's (which polls)."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched(module):
        return monkey.get_original(module, name)
    patcher = sys.modules.get("eventlet.patcher")
    if patcher is not None and patcher.is_monkey_patched(module):
        return getattr(patcher.original(module), name)
    return getattr(sys.modules.get(module) or __import__(module), name)


def _gevent() -> bool:
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("socket"))


def _clean(run: Callable[[], int]) -> int:
    """Run *run* where no greenlet of the worker can run on, and return its status.

    A fork keeps the worker's hub and every greenlet waiting on it. Under eventlet a new
    hub for this thread leaves them behind. Under gevent *run* goes to a real thread,
    whose hub is its own, and this thread (with the worker's hub) waits for it with a
    lock of the system's own: the worker's greenlets never run here.
    """
    _new_green_hub()
    if not _gevent():
        return run()
    start = _original("_thread", "start_new_thread")
    done = _original("_thread", "allocate_lock")()
    done.acquire()
    status = [1]  # an exception in *run* is no clean exit

    def main() -> None:
        try:
            status[0] = run()
        finally:
            done.release()

    start(main, ())
    done.acquire()
    return status[0]


def _rewrap(sock: socket.socket) -> socket.socket:
    """*sock* anew, in the calling thread: a gevent socket waits on the hub it was made
    on. (Elsewhere the same socket would do; a new object is as good.)"""
    return socket.socket(fileno=sock.detach()) if _gevent() else sock


def _new_green_hub() -> None:
    """Under eventlet the fork shares the worker's hub (its epoll set): make our own.
    (gevent's fork makes a new hub itself.)"""
    if "eventlet" not in sys.modules:
        return
    from eventlet import hubs, patcher  # type: ignore[import-untyped]

    if patcher.is_monkey_patched("socket"):
        hubs.use_hub()
