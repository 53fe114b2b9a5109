"""The wire between a worker, its keeper and its heartbeat process: one type per kind of
message, and the one encode and decode of them all.

Every message is one packet of a ``SOCK_SEQPACKET`` socket pair. Who sends which:

* worker → keeper → heartbeat process: :class:`Add` (beat this message),
  :class:`Acked` (Celery acknowledged it), :class:`Ask` (a shutdown's question);
* heartbeat process → keeper: :class:`Tick` (alive), :class:`Done` (no longer held);
* heartbeat process → worker, the reporter's reports: :class:`Answered`,
  :class:`HeartbeatEnded`, :class:`Log`, :class:`Reply`, :class:`Dropped`;
* keeper → worker: :class:`Started` (a heartbeat process forked), :class:`GaveUp`
  (its last word).
"""

from __future__ import annotations

import _socket
import pickle
from typing import Any, NamedTuple

from .._heartbeat import Ended, Heartbeat, Outcome
from .._settings import HeartbeatOptions

#: The largest packet read: a message's receipt handle and queue URL, or a log record
#: with its traceback, fit many times over.
MAX_PACKET = 1 << 20
_DONTWAIT = _socket.MSG_DONTWAIT | getattr(_socket, "MSG_NOSIGNAL", 0)
_PICKLE = pickle.HIGHEST_PROTOCOL


# -- commands: the worker's, handed on by the keeper -------------------------------------


class Add(NamedTuple):
    """Beat this message from its receipt. Its *options* only where they differ from
    its task's resolved at the worker's start, which the heartbeat process inherits."""

    receipt_handle: str
    queue_url: str
    options: HeartbeatOptions | None
    received: float
    task_name: str
    task_id: str

    def heartbeat(self, known: dict[str, HeartbeatOptions], settled: Any = None) -> Heartbeat:
        """The heartbeat it asks for; *settled* tells whether Celery acknowledged it."""
        return Heartbeat(
            self.receipt_handle,
            self.queue_url,
            self.options or known[self.task_name],
            self.received,
            self.task_name,
            self.task_id,
            settled,
        )


class Acked(NamedTuple):
    """Celery acknowledged, rejected or requeued the message: end its heartbeat."""

    receipt_handle: str


class HandBack(NamedTuple):
    """A question: end these heartbeats and make their messages visible now."""

    receipt_handles: list[str]


class StopAll(NamedTuple):
    """A question: end every heartbeat but those of *keep*."""

    reason: Ended
    keep: frozenset[str]


Question = HandBack | StopAll


class Ask(NamedTuple):
    """One of the worker's questions at shutdown; its :class:`Reply` carries *ident*."""

    ident: int
    question: Question


# -- the heartbeat process's word to its keeper ----------------------------------------------


class Tick(NamedTuple):
    """The heartbeat process's main loop turned, and its sidecar's loop is healthy."""


class Done(NamedTuple):
    """The heartbeat process ended this message's heartbeat: the keeper holds it no more."""

    receipt_handle: str


# -- reports to the worker -----------------------------------------------------------------


class Answered(NamedTuple):
    """SQS's answer to one entry of a call, applied (``Reporter.settled``)."""

    outcome: Outcome


class HeartbeatEnded(NamedTuple):
    """A heartbeat ended (``Reporter.ended``)."""

    hb: Heartbeat
    beats: int
    detail: str


class Log(NamedTuple):
    """One of the heartbeat process's log records, as a dict, for the worker to log."""

    fields: dict[str, Any]


class Reply(NamedTuple):
    """The answer to the :class:`Ask` of *ident*."""

    ident: int
    value: Any


class Dropped(NamedTuple):
    """Reports dropped because the worker did not read them in time: how many."""

    reports: int


class Started(NamedTuple):
    """The keeper forked heartbeat process *pid*; in place of *old* (0: the first), which
    ended as *status*; beats were *paused* for that long; it handed it *held* messages."""

    pid: int
    old: int
    status: str
    paused: float
    held: int


class GaveUp(NamedTuple):
    """The keeper gives up forking heartbeat processes, and why."""

    why: str


Message = (
    Add
    | Acked
    | Ask
    | Tick
    | Done
    | Answered
    | HeartbeatEnded
    | Log
    | Reply
    | Dropped
    | Started
    | GaveUp
)
_KINDS: tuple[type[Any], ...] = (
    Add,
    Acked,
    Ask,
    Tick,
    Done,
    Answered,
    HeartbeatEnded,
    Log,
    Reply,
    Dropped,
    Started,
    GaveUp,
)
_CODES = {kind: code for code, kind in enumerate(_KINDS)}


def encode(message: Message) -> bytes:
    """*message* as one packet: its kind's number and its fields (as small as a tuple)."""
    return pickle.dumps((_CODES[type(message)], *message), _PICKLE)


def decode(packet: bytes) -> Message:
    """The message of one packet from :func:`encode`."""
    code, *fields = pickle.loads(packet)
    return _KINDS[code]._make(fields)  # type: ignore[no-any-return]


# -- the sockets ----------------------------------------------------------------------------


def send(sock: Any, message: Message | bytes) -> bool:
    """Send one message (or an encoded one) without waiting; False if it does not fit
    now (or the other end is gone: the keeper learns that at the end-of-file; or there
    is none yet)."""
    if sock is None:
        return False
    packet = message if isinstance(message, bytes) else encode(message)
    try:
        sock.send(packet, _DONTWAIT)
    except OSError:  # BlockingIOError too: it does not fit now
        return False
    return True


def raw(sock: Any) -> Any:
    """*sock* as the C library's socket, which never waits: no green wrapper can wait on
    a hub for it, and no default time-out (``socket.setdefaulttimeout``) makes a send
    poll first."""
    return nonblocking(_socket.socket(fileno=sock.detach()))


def nonblocking(sock: Any) -> Any:
    sock.settimeout(0)
    return sock
