"""The heartbeat process's life: it beats what the keeper hands on, from a sidecar of its
own, reports to the worker, and ticks to the keeper.

It owns its sidecar and the sending of every report; the keeper (``keeper``) forks it,
the worker (``link``) reads its reports. Every send is on a C library socket, which
never waits: a green socket would wait on its hub until the worker reads, and stop the
beats. Only its commands are read through its own (green) socket.
"""

from __future__ import annotations

import _socket
import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, NamedTuple

from .. import _system
from .._client import Clients
from .._heartbeat import Ended, Heartbeat, Outcome
from .._report import Counters
from .._send import Answer, Sender
from .._settings import HeartbeatOptions
from .._sidecar import Sidecar
from .._slots import Slots
from . import wire
from .keeper import TICK

logger = logging.getLogger("celery_sqs_heartbeat")

#: How often the heartbeat process ticks to its keeper and reads its commands, in seconds.
TICK_EVERY = TICK
#: How long the heartbeat process waits for its sidecar's calls in flight as it exits.
EXIT_WAIT = 2.0
#: The heartbeat process's name in the worker's log lines (``%(processName)s``), and in ps.
PROCESS_NAME = "HeartbeatProcess"
#: The name prefix of its threads (its sidecar's are the sidecar's own).
THREAD_PREFIX = "celery-sqs-heartbeat-beat"
#: How long the heartbeat process tries to send an answer the worker has not room for yet.
ANSWER_WAIT = 5.0


class Config(NamedTuple):
    """What each heartbeat process is forked with: the slots, how to make its SQS clients,
    its log level, the tasks' options resolved at the worker's start, how long it may
    go without a tick, and the worker's PID (for ``ps``)."""

    slots: Slots
    make_clients: Callable[[], Clients]
    level: int
    options: dict[str, HeartbeatOptions]
    hang: float
    worker: int


def ask(sidecar: Sidecar, question: wire.Question) -> Any:
    """Run one of the worker's shutdown questions on *sidecar*."""
    if isinstance(question, wire.HandBack):
        return sidecar.hand_back(question.receipt_handles)
    return sidecar.stop_all(question.reason, keep=question.keep)


class _Forwarder:
    """The heartbeat process's reporter (``_report.Reports``): it hands every report to the
    worker, which reports it, and tells the keeper of each heartbeat that ended (it
    holds that message no more)."""

    def __init__(self, counters: Counters, reports: Any, link: Any) -> None:
        self.counters = counters
        self._reports = reports
        self._link = link
        #: Reports dropped because the worker did not read them in time.
        self.dropped = 0

    def started(self, hb: Heartbeat) -> None:
        pass  # the worker reported it at task_received

    def outcome(self, s: Outcome) -> None:
        if s.answer.error is not None:
            s = _portable(s)
        self._forward(wire.Answered(s))

    def ended(self, hb: Heartbeat, beats: int, detail: str = "") -> None:
        wire.send(self._link, wire.Done(hb.receipt_handle))
        self._forward(wire.HeartbeatEnded(hb, beats, detail))

    def _forward(self, report: wire.Message) -> None:
        if not wire.send(self._reports, report):
            self.dropped += 1
        elif self.dropped and wire.send(self._reports, wire.Dropped(self.dropped)):
            self.dropped = 0


class HeartbeatProcessError(Exception):
    """An unexpected error in the heartbeat process, as its traceback."""


def _portable_answer(answer: Answer) -> Answer:
    """*answer* with its error as text: an exception may not survive pickling."""
    if answer.error is None:
        return answer
    text = "".join(traceback.format_exception(answer.error)).rstrip()
    return Answer(answer.failure, answer.detail, HeartbeatProcessError(text))


def _portable(s: Outcome) -> Outcome:
    """*s* with its error as text."""
    answer = _portable_answer(s.answer)
    return Outcome(
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
    """Hands the heartbeat process's own log records to the worker, which logs them."""

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
        wire.send(self._reports, wire.Log(fields))


def serve(config: Config, link_fd: int, reports: Any) -> int:
    """The heartbeat process's life: beat what the keeper hands on, and tick to it, until
    the keeper is gone. Returns its exit status."""
    keeper = os.getppid()
    _system.die_with_parent()
    if os.getppid() != keeper:
        return 0
    _system.set_title("heartbeat process", config.worker)
    link = wire.raw(_socket.socket(fileno=link_fd))
    logger.handlers[:] = [_ForwardLogs(reports)]
    logger.propagate = False
    if config.level:
        logger.setLevel(config.level)
    try:
        return _beat(config, link, reports, keeper)
    except Exception:
        logger.exception("celery-sqs-heartbeat: unexpected error in the heartbeat process")
        return 1


def _beat(config: Config, link: Any, reports: Any, keeper: int) -> int:
    slots, options = config.slots, config.options
    counters = Counters(*slots.counter_blocks(None, beat=True))
    slots.forget_in_flight()
    clients = config.make_clients()
    # Warmed up on a thread of its own: ticks go on meanwhile (STS may take seconds).
    threading.Thread(
        target=warm_up, args=(clients,), name=f"{THREAD_PREFIX}-warm", daemon=True
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
    commands.settimeout(TICK_EVERY)
    ticked = 0.0
    while True:
        try:
            packet: bytes | None = commands.recv(wire.MAX_PACKET)
        except TimeoutError:
            packet = None
        except OSError:
            break
        if packet == b"":
            break  # the keeper closed its end (the worker's shutdown), or died
        if packet:
            _obey(sidecar, reports, options, wire.decode(packet))
        now = time.monotonic()
        if now - ticked >= TICK_EVERY:
            if os.getppid() != keeper:
                break
            if sidecar.healthy(now):  # a loop that stopped turning earns no tick
                ticked = now
                wire.send(link, wire.Tick())
    sidecar.shutdown(EXIT_WAIT)
    return 0


def _obey(
    sidecar: Sidecar, reports: Any, options: dict[str, HeartbeatOptions], command: wire.Message
) -> None:
    if isinstance(command, wire.Add):  # counted by the worker as it received the message
        sidecar.add(command.heartbeat(options), counted=False)
    elif isinstance(command, wire.Acked):
        sidecar.stop(command.receipt_handle, Ended.SETTLED)
    elif isinstance(command, wire.Ask):
        # On a thread of its own: a hand-back makes SQS calls, and the ticks go on.
        threading.Thread(
            target=_answer,
            args=(sidecar, reports, command),
            name=f"{THREAD_PREFIX}-answer",
            daemon=True,
        ).start()


def _answer(sidecar: Sidecar, reports: Any, command: wire.Ask) -> None:
    """Run one of the worker's questions at its shutdown, and send the answer: the
    worker's main thread waits for it, so a full buffer is waited out a little."""
    answer = ask(sidecar, command.question)
    if isinstance(command.question, wire.HandBack):
        answer = [(hb, _portable_answer(a)) for hb, a in answer]
    reply = wire.encode(wire.Reply(command.ident, answer))
    deadline = time.monotonic() + ANSWER_WAIT
    while not wire.send(reports, reply) and time.monotonic() < deadline:
        time.sleep(TICK_EVERY / 10)


def warm_up(clients: Clients, who: str = "the heartbeat process") -> None:
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
