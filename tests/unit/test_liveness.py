"""How the main process tells that a pool process is alive before each beat: by a pidfd
kept for that very process (not for its PID), by /proc where there are no pidfds, and
from the sidecar's sender threads at once. Processes are real forks; a reused PID, which
a test cannot make happen, is faked."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import select
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from celery_sqs_heartbeat import _liveness
from celery_sqs_heartbeat._slots import Slots, key_of

pytestmark = pytest.mark.timeout(30)

RH = key_of("rh")
#: A start time no real process of this machine has (they count from boot).
FAKE_START = 1


@contextlib.contextmanager
def child_process(first: Callable[[], object] = lambda: None) -> Iterator[int]:
    """A forked child that does *first*, then lives until the block ends (and is
    reaped)."""
    ready, done = os.pipe()
    hold, release = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(release)
        first()
        os.write(done, b"x")
        os.read(hold, 1)  # until the parent closes its end
        os._exit(0)
    os.close(hold)
    os.close(done)
    try:
        os.read(ready, 1)
        yield pid
    finally:
        os.close(release)
        os.close(ready)
        os.waitpid(pid, 0)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def no_pidfds(monkeypatch: pytest.MonkeyPatch, refusal: BaseException | None) -> None:
    """``os.pidfd_open`` refuses with *refusal*, or (None) does not exist."""
    if refusal is None:
        monkeypatch.delattr(os, "pidfd_open", raising=False)
        return

    def pidfd_open(pid: int, flags: int = 0) -> int:
        raise refusal

    monkeypatch.setattr(os, "pidfd_open", pidfd_open)


#: How ``os.pidfd_open`` fails where there are no pidfds: an old kernel, Docker's old
#: seccomp profile, a Python or platform without it.
REFUSALS = [
    pytest.param(OSError(errno.ENOSYS, "Function not implemented"), id="ENOSYS"),
    pytest.param(PermissionError(errno.EPERM, "Operation not permitted"), id="EPERM"),
    pytest.param(None, id="missing"),
]


def in_flight(slots: Slots, index: int) -> int:
    return int(slots._table[index].in_flight)


# -- 1. a reused PID -------------------------------------------------------------------


def test_a_new_child_with_a_dead_childs_pid_is_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    """max_tasks_per_child: a child exits after its pidfd was kept, and the next child
    gets its PID. The new child's task must not be read through the dead one's pidfd
    (it would look dead, and its heartbeat end). This process plays the new child; the
    old one, with the same PID, is faked: a real child's pidfd, a start time of its own."""
    slots = Slots(1)  # before the fakes: it probes the platform
    pid = os.getpid()
    with child_process() as old:
        real_pidfd_open = os.pidfd_open
        monkeypatch.setattr(os, "pidfd_open", lambda _pid, flags=0: real_pidfd_open(old))
        monkeypatch.setattr(_liveness, "read_stat", lambda _pid: _liveness.Stat("S", FAKE_START))
        slots.attach(0, pid)  # the old child
        slots.started(0, key_of("first"))
        view = slots.begin(key_of("first"), 0)
        assert view is not None and view.alive
        slots.finish(0)
        monkeypatch.undo()
    # The old child has exited (and its pidfd says so); the new one takes its PID.
    slots.attach(0, pid)
    slots.started(0, RH)
    view = slots.begin(RH, 0)
    assert view is not None and view.running and view.alive and view.fenced
    slots.finish(0)


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "no-pidfd"])
def test_a_pid_that_names_another_process_now_is_dead(
    monkeypatch: pytest.MonkeyPatch, pidfd: bool
) -> None:
    """The child died and its PID went to another process before the first beat: the
    process at the PID is alive, but it is not the one that attached."""
    slots = Slots(1)
    monkeypatch.setattr(_liveness, "read_stat", lambda _pid: _liveness.Stat("S", FAKE_START))
    slots.attach(0, os.getpid())  # the child that died, as it attached
    monkeypatch.undo()
    if not pidfd:
        no_pidfds(monkeypatch, OSError(errno.ENOSYS, "Function not implemented"))
    slots.started(0, RH)
    view = slots.begin(RH, 0)
    assert view is not None and view.running and not view.alive and not view.fenced
    assert in_flight(slots, 0) == 0


# -- 2. without pidfds -----------------------------------------------------------------


@pytest.mark.parametrize("refusal", REFUSALS)
def test_a_zombie_is_dead_without_pidfds(
    monkeypatch: pytest.MonkeyPatch, refusal: BaseException | None
) -> None:
    """A pool process that exited and is not yet reaped: kill(pid, 0) still reaches it,
    /proc says it is a zombie."""
    slots = Slots(1)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        slots.attach(0, os.getpid())
        slots.started(0, RH)
        os._exit(0)
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # exited, left unreaped
        no_pidfds(monkeypatch, refusal)
        view = slots.begin(RH, 0)
        assert view is not None and view.running and not view.alive and not view.fenced
        assert in_flight(slots, 0) == 0
    finally:
        os.waitpid(pid, 0)


@pytest.mark.parametrize("refusal", REFUSALS)
def test_a_live_child_is_alive_without_pidfds(
    monkeypatch: pytest.MonkeyPatch, refusal: BaseException | None
) -> None:
    slots = Slots(1)
    with child_process() as pid:
        slots.attach(0, pid)  # as the child would
        no_pidfds(monkeypatch, refusal)
        slots.started(0, RH)
        view = slots.begin(RH, 0)
        assert view is not None and view.running and view.alive and view.fenced
        slots.finish(0)


def test_a_process_we_may_not_signal_is_dead_and_leaves_no_beat_in_flight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No pidfds and no /proc: kill(pid, 0) is all there is, and its EPERM says the PID
    is another user's process now, not our child."""
    monkeypatch.setattr(_liveness, "probe", lambda: _liveness.Platform(pidfd=False, proc=False))
    slots = Slots(1)
    slots.attach(0, os.getpid())
    slots.started(0, RH)
    no_pidfds(monkeypatch, OSError(errno.ENOSYS, "Function not implemented"))

    def kill(pid: int, sig: int) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "kill", kill)
    view = slots.begin(RH, 0)
    assert view is not None and view.running and not view.alive and not view.fenced
    assert in_flight(slots, 0) == 0


def test_a_liveness_check_that_raises_leaves_no_beat_in_flight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Else the task's postrun would wait STOP_WAIT for a beat that was never sent."""
    slots = Slots(1)
    slots.attach(0, os.getpid())
    slots.started(0, RH)

    def broken(*_: object) -> bool:
        raise RuntimeError("a bug")

    monkeypatch.setattr(slots._watch, "alive", broken)
    with pytest.raises(RuntimeError):
        slots.begin(RH, 0)
    assert in_flight(slots, 0) == 0


def test_a_command_with_parentheses_and_spaces_is_read_right() -> None:
    """/proc/<pid>/stat puts the command in parentheses, unescaped: its fields are read
    after the last ")"."""

    def rename() -> None:
        with open("/proc/self/comm", "w") as comm:
            comm.write("a) b (c) 9 9")

    with child_process(rename) as pid:
        stat, own = _liveness.read_stat(pid), _liveness.read_stat(os.getpid())
    assert stat is not None and own is not None
    assert stat.state in ("R", "S")
    assert stat.start >= own.start  # the child started after this process


# -- 3. the sender threads at once -----------------------------------------------------


def test_two_threads_that_open_a_childs_pidfd_at_once_keep_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two slots' beats, in two sender threads, both find no pidfd for their process and
    open one: one is kept, the other closed (none leaks)."""
    slots = Slots(2)
    for index in (0, 1):
        slots.attach(index, os.getpid())
        slots.started(index, key_of(f"rh{index}"))
    both = threading.Barrier(2, timeout=5)
    real_pidfd_open = os.pidfd_open

    def pidfd_open(pid: int, flags: int = 0) -> int:
        fd = real_pidfd_open(pid, flags)
        both.wait()  # neither has kept its pidfd yet
        return fd

    monkeypatch.setattr(os, "pidfd_open", pidfd_open)
    before = open_fds()
    errors = run_threads([functools.partial(beat, slots, key_of(f"rh{i}"), i) for i in (0, 1)])
    assert errors == []
    assert open_fds() - before == len(slots._watch._pidfds) == 1


def test_two_threads_that_see_a_child_dead_at_once_both_say_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two beats of a process that died, in two sender threads: the kept pidfd is
    forgotten and closed once, and neither thread fails."""
    slots = Slots(2)
    with child_process() as pid:
        for index in (0, 1):
            slots.attach(index, pid)  # a worker whose tasks all run in one process
            slots.started(index, key_of(f"rh{index}"))
        view = slots.begin(key_of("rh0"), 0)  # its pidfd is kept
        assert view is not None and view.alive
        slots.finish(0)
        os.kill(pid, signal.SIGKILL)
    both = threading.Barrier(2, timeout=0.5)

    class Poll:
        """A poll that waits (a little) for the other thread to poll too."""

        def __init__(self) -> None:
            self._poll = select.poll()

        def register(self, fd: int, events: int) -> None:
            self._poll.register(fd, events)

        def poll(self, timeout: float) -> list[tuple[int, int]]:
            with contextlib.suppress(threading.BrokenBarrierError):
                both.wait()
            return self._poll.poll(timeout)

    monkeypatch.setattr(_liveness, "_poll", Poll)
    before = open_fds()
    alive: list[bool] = []

    def beat_of(index: int) -> None:
        alive.append(beat(slots, key_of(f"rh{index}"), index))

    errors = run_threads([functools.partial(beat_of, i) for i in (0, 1)])
    assert errors == []
    assert alive == [False, False]
    assert open_fds() - before == -1 and slots._watch._pidfds == {}


def test_many_threads_beating_while_the_pidfds_are_pruned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Four sender threads, each beating a slot whose process is replaced at every beat,
    so that the kept pidfds of replaced processes are pruned all the while: nothing
    fails, and every pidfd not kept is closed. Not deterministic: before the lock it
    failed in each of six runs (two threads pruning one pidfd: a KeyError)."""
    capacity, rounds = 4, 300
    slots = Slots(capacity)
    watched, unwritten = os.pipe()  # never readable: every process is alive
    monkeypatch.setattr(os, "pidfd_open", lambda _pid, flags=0: os.dup(watched))
    monkeypatch.setattr(_liveness, "read_stat", lambda _pid: _liveness.Stat("S", FAKE_START))
    pids = iter(range(10_000_000, 20_000_000))  # above any pid_max: no real process
    next_pid = threading.Lock()

    def replaced_at_every_beat(index: int) -> None:
        for _ in range(rounds):
            with next_pid:
                pid = next(pids)
            slots.attach(index, pid)
            slots.started(index, key_of(f"rh{index}"))
            assert beat(slots, key_of(f"rh{index}"), index)

    before = open_fds()
    try:
        errors = run_threads(
            [functools.partial(replaced_at_every_beat, i) for i in range(capacity)]
        )
        assert errors == []
        assert open_fds() - before == len(slots._watch._pidfds) <= 2 * capacity
    finally:
        os.close(watched)
        os.close(unwritten)


def beat(slots: Slots, key: int, index: int) -> bool:
    """One beat's read of the slot, as a sender thread makes it: whether the process
    is alive."""
    view = slots.begin(key, index)
    assert view is not None and view.running
    if view.fenced:
        slots.finish(index)
    return view.alive


def run_threads(targets: list[Callable[[], Any]]) -> list[BaseException]:
    """Run *targets* in threads at once; what they raised."""
    errors: list[BaseException] = []

    def run(target: Callable[[], Any]) -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    return errors


# -- 4. what the worker says of this platform --------------------------------------------


@pytest.mark.parametrize(
    ("pidfd", "proc", "said"),
    [
        (True, True, []),
        (False, True, ["no pidfd"]),
        (True, False, ["start time"]),
        (False, False, ["no pidfd", "kill(pid, 0)"]),
    ],
)
def test_the_platform_report_says_what_liveness_lacks(
    monkeypatch: pytest.MonkeyPatch, pidfd: bool, proc: bool, said: list[str]
) -> None:
    monkeypatch.setattr(_liveness, "probe", lambda: _liveness.Platform(pidfd=pidfd, proc=proc))
    lines = _liveness.platform_report()
    assert len(lines) == len(said)
    assert all(word in line for word, line in zip(said, lines, strict=True))


def test_the_platform_probe_matches_this_machine() -> None:
    """The probe's answer is what the checks themselves meet here."""
    platform = _liveness.probe()
    try:
        os.close(os.pidfd_open(os.getpid()))
        pidfd = True
    except (AttributeError, OSError):
        pidfd = False
    assert platform.pidfd is pidfd
    assert platform.proc is (_liveness.read_stat("self") is not None)
    assert isinstance(_liveness.platform_report(), list)


def test_a_child_is_not_dead_because_no_file_can_be_opened(monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of file descriptors (EMFILE), neither a pidfd nor /proc can be opened: that
    is no proof that the child exited, and its heartbeat must go on."""
    with child_process() as pid:
        slots = Slots(1)
        slots.attach(0, pid)  # its identity read from /proc, as the child would write it

        def no_fd(*args: Any, **kwargs: Any) -> int:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

        monkeypatch.setattr(os, "pidfd_open", no_fd)
        monkeypatch.setattr(os, "open", no_fd)
        slots.started(0, RH)
        view = slots.begin(RH, None)
        assert view is not None and view.alive
