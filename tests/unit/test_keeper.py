"""The keeper and the worker's link, without a worker: real forks, a fake SQS client.

Each test stops, starves or breaks one part and checks that it heals, or that the
worker falls back to beating from its own process, and says so.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from celery_sqs_heartbeat._beat import HeartbeatProcess, wire
from celery_sqs_heartbeat._heartbeat import Ended, Heartbeat
from celery_sqs_heartbeat._report import Counters, Reporter
from celery_sqs_heartbeat._send import Sender
from celery_sqs_heartbeat._sidecar import Sidecar
from celery_sqs_heartbeat._slots import Slots
from celery_sqs_heartbeat.testing import wait_for

from ..support.fake_sidecar import OPTIONS

pytestmark = pytest.mark.timeout(60)

#: A margin of 4 s: the hang limit is 1 s.
MARGIN = 4.0


def fake_clients() -> Any:
    return SimpleNamespace(for_queue=lambda url: None, timeout=1.0, warm_up=lambda: None)


def broken_clients() -> Any:
    raise RuntimeError("no client here")  # each heartbeat process dies at its start


class Fallback:
    """The worker's own sidecar, as the role would make it, with the reasons it was
    made for."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.why: list[str] = []
        self.sidecar: Sidecar | None = None

    def __call__(self, why: str) -> Sidecar:
        self.why.append(why)
        self.sidecar = Sidecar(
            Sender(lambda url: None), Reporter(self.counters, region=lambda: None), call_timeout=1
        )
        return self.sidecar


@pytest.fixture
def make() -> Iterator[Callable[..., tuple[HeartbeatProcess, Counters, Fallback]]]:
    made: list[HeartbeatProcess] = []

    def make(
        clients: Callable[[], Any] = fake_clients,
    ) -> tuple[HeartbeatProcess, Counters, Fallback]:
        slots = Slots(1, ended=16)
        slots.attach(0, os.getpid())
        counters = Counters(*slots.counter_blocks(None))
        fallback = Fallback(counters)
        beats = HeartbeatProcess(
            slots,
            Reporter(counters, region=lambda: None),
            clients,
            {},
            margin=MARGIN,
            fallback=fallback,
        )
        beats.spawn()
        beats.start()
        made.append(beats)
        return beats, counters, fallback

    yield make
    for beats in made:
        beats.close()


def add(beats: HeartbeatProcess, n: int, prefix: str = "rh") -> None:
    now = time.monotonic()
    for i in range(n):
        hb = Heartbeat(f"{prefix}{i}", "q", OPTIONS, now, "t", str(i))  # due in 30 s
        beats.add(hb, SimpleNamespace(acknowledged=False))


def test_a_keeper_that_reads_nothing_never_holds_up_the_worker(
    make: Callable[..., tuple[HeartbeatProcess, Counters, Fallback]],
) -> None:
    """Stop the keeper: 2,000 messages received meanwhile (seven times what the socket's
    buffer holds) are handed on without waiting; the worker kills the silent keeper
    within the hang limit, forks another, and hands it every message."""
    beats, counters, _ = make()
    wait_for(lambda: beats.pid, timeout=5, what="the heartbeat process")
    keeper = beats.keeper
    os.kill(keeper, signal.SIGSTOP)
    began = time.monotonic()
    add(beats, 2000)
    assert time.monotonic() - began < 1.0, "a send waited for the stopped keeper"

    wait_for(lambda: beats.keeper not in (0, keeper), timeout=beats.hang + 3, what="a keeper")
    # Handed over a buffer's worth at a time, then each ended: a few seconds on a busy
    # machine, which is what the generous wait is for.
    assert beats.ask(wire.StopAll(Ended.HANDED_BACK, frozenset()), 30) == 2000
    assert counters.stats().started == 2000


def test_a_heartbeat_process_that_stops_is_replaced_and_handed_every_message(
    make: Callable[..., tuple[HeartbeatProcess, Counters, Fallback]],
) -> None:
    """SIGSTOP the heartbeat process: the keeper hears no tick, kills it within the hang
    limit, and hands the new one every message, including those sent meanwhile."""
    beats, counters, _ = make()
    first = wait_for(lambda: beats.pid, timeout=5, what="the heartbeat process")
    add(beats, 10, "before")
    wait_for(lambda: counters.stats().started == 10, timeout=5, what="ten heartbeats")
    os.kill(first, signal.SIGSTOP)
    add(beats, 10, "during")
    wait_for(lambda: beats.pid != first, timeout=beats.hang + 3, what="a new heartbeat process")
    assert beats.ask(wire.StopAll(Ended.HANDED_BACK, frozenset()), 10) == 20
    stats = counters.stats()
    assert (stats.started, stats.active) == (20, 0), stats


def test_heartbeat_processes_that_keep_dying_end_in_the_fallback(
    make: Callable[..., tuple[HeartbeatProcess, Counters, Fallback]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every heartbeat process dies at its start: after five in a row the keeper gives up,
    and the worker beats every message it holds from its own process, saying why."""
    beats, _, fallback = make(broken_clients)
    add(beats, 3)
    wait_for(lambda: fallback.why, timeout=20, what="the fallback")
    (why,) = fallback.why
    assert "gave up" in why and "after its start" in why, why
    wait_for(lambda: all(beats.holds(f"rh{i}") for i in range(3)), timeout=5, what="held")
    add(beats, 1, "later")  # a message received after the fallback is beaten here too
    wait_for(lambda: beats.holds("later0"), timeout=5, what="the later one")
    assert fallback.sidecar is not None and len(fallback.sidecar) == 4


def test_the_drain_has_one_deadline(
    make: Callable[..., tuple[HeartbeatProcess, Counters, Fallback]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A heartbeat process that does not answer holds the shutdown up once, not once per
    chunk of messages, and the worker says what it did not hand back."""
    beats, _, _ = make()
    first = wait_for(lambda: beats.pid, timeout=5, what="the heartbeat process")
    add(beats, 300)
    os.kill(first, signal.SIGSTOP)
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="celery_sqs_heartbeat"):
        answers = beats.hand_back([f"rh{i}" for i in range(300)], timeout=1.0)
    assert time.monotonic() - began < 2.0
    # The keeper may replace the stopped one in time for a chunk: never all of them.
    assert len(answers) < 300
    assert f"did not hand back {300 - len(answers)} waiting messages within 1 s" in caplog.text


class SlowClients:
    """Clients whose warm-up takes longer than the hang limit (STS, the metadata)."""

    timeout = 1.0

    def for_queue(self, url: str) -> None:
        return None

    def warm_up(self) -> None:
        time.sleep(3)


def test_a_heartbeat_process_ticks_while_its_client_warms_up(
    make: Callable[..., tuple[HeartbeatProcess, Counters, Fallback]],
) -> None:
    """A client that takes 3 s to make (three hang limits) does not get its heartbeat process
    killed as stopped: it ticks meanwhile."""
    beats, _, fallback = make(SlowClients)
    first = wait_for(lambda: beats.pid, timeout=5, what="the heartbeat process")
    time.sleep(3.5)
    assert beats.pid == first and not fallback.why


def test_the_fallback_forgets_the_beats_in_flight_of_the_dead_heartbeat_process() -> None:
    """A heartbeat process killed with a beat in flight leaves its count in the slot; once
    the worker beats itself, no task_postrun waits for it."""
    slots = Slots(1, ended=16)
    slots.attach(0, os.getpid())
    counters = Counters(*slots.counter_blocks(None))
    fallback = Fallback(counters)
    beats = HeartbeatProcess(
        slots, Reporter(counters, region=lambda: None), fake_clients, {}, fallback=fallback
    )
    from celery_sqs_heartbeat._slots import key_of

    slots.started(0, key_of("rh"))
    view = slots.begin(key_of("rh"), None)  # as the dead heartbeat process did
    assert view is not None and view.fenced
    beats.fall_back("the test's reason")
    try:
        began = time.monotonic()
        slots.ended(0)
        assert time.monotonic() - began < 0.1, "task_postrun waited for a dead process's beat"
    finally:
        beats.close()


def test_a_send_never_waits_even_with_a_default_socket_timeout() -> None:
    """``socket.setdefaulttimeout`` makes a socket poll before each send, whatever its
    flags: the keeper's sockets never do."""
    import socket as socket_module

    socket_module.setdefaulttimeout(5)
    try:
        mine, theirs = socket_module.socketpair(socket_module.AF_UNIX, socket_module.SOCK_SEQPACKET)
        sock = wire.raw(mine)
        began = time.monotonic()
        while wire.send(sock, b"x" * 1000):
            assert time.monotonic() - began < 1
        assert time.monotonic() - began < 1, "a full socket's send waited"
    finally:
        socket_module.setdefaulttimeout(None)
        theirs.close()


def test_a_child_killed_by_a_real_time_signal_is_said() -> None:
    from celery_sqs_heartbeat import _system

    assert _system.status(40) == "was killed by signal 40"  # SIGRTMIN+6 on Linux
    assert _system.status(9) == "was killed by SIGKILL"


def test_ps_tells_the_keeper_from_the_heartbeat_process(
    make: Callable[..., tuple[HeartbeatProcess, Counters, Fallback]],
) -> None:
    """Each names itself, and the worker it serves, through ``setproctitle`` (as Celery
    names its own processes), so ``ps`` and ``top`` show which is which."""
    pytest.importorskip("setproctitle")
    beats, _, _ = make()
    pid = wait_for(lambda: beats.pid, timeout=5, what="the heartbeat process")

    def title(of: int) -> str:
        with open(f"/proc/{of}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode().strip()

    worker = os.getpid()
    wait_for(
        lambda: title(beats.keeper).startswith("[celery-sqs-heartbeat keeper]"),
        timeout=5,
        what="the keeper's title",
    )
    assert title(beats.keeper) == f"[celery-sqs-heartbeat keeper] of worker {worker}"
    wait_for(
        lambda: title(pid).startswith("[celery-sqs-heartbeat heartbeat process]"),
        timeout=5,
        what="the heartbeat process's title",
    )
    assert title(pid) == f"[celery-sqs-heartbeat heartbeat process] of worker {worker}"
