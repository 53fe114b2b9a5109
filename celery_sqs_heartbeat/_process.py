"""This process's part in a worker: the one role object, replaced whole at fork.

A role is what the handlers hand each signal to (``_roles`` builds them). This module
holds only the role's interface, the do-nothing role, and the one place the current
role is kept, so that the handlers, the shutdown's drain and the public API all read it
without importing one another.
"""

from __future__ import annotations

import os
from typing import Any

from ._beats import NO_BEATS, Beats
from ._guard import forget_notes
from ._report import Counters
from ._settings import HeartbeatOptions
from ._tasks import NO_TASKS, Tasks


class Role:
    """A process that serves no heartbeat: every handler does nothing.

    Two parts are composed into every role, each the do-nothing one here: *beats*, the
    thing that beats the messages this process receives (``_beats.Beats``), and
    *tasks*, the task side, which tells the beats when a task starts and ends
    (``_tasks.Tasks``)."""

    beats: Beats = NO_BEATS
    tasks: Tasks = NO_TASKS

    def __init__(self) -> None:
        #: Effective options by task name, resolved at worker start.
        self.options: dict[str, HeartbeatOptions] = {}
        self.counters = Counters()

    def received(self, request: Any) -> None:
        """``task_received``: a message this process received (its main process)."""

    def ready(self, consumer: Any) -> None:
        """``worker_ready``: the consumer is connected; start what beats."""

    def shutdown(self) -> None:
        """``worker_shutdown``: stop what beats."""
        self.beats.close()

    def forked(self) -> Role:
        """The role of a process forked from this one."""
        return Role()

    def in_pool_process(self) -> Role:
        """The role once ``worker_process_init`` says this is a pool process."""
        return self


#: This process's role.
_role = Role()


def role() -> Role:
    """This process's role."""
    return _role


def become(new: Role) -> None:
    """Make *new* this process's role."""
    global _role
    _role = new


def reset() -> None:
    """Back to a process that serves nothing, and forget what was said (tests, uninstall)."""
    global _role
    _role.shutdown()
    _role = Role()
    forget_notes()


def _after_fork_in_child() -> None:
    global _role
    _role = _role.forked()


os.register_at_fork(after_in_child=_after_fork_in_child)
