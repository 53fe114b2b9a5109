"""The heartbeat process: the beats of a threads, solo, gevent or eventlet worker come from a
small process of the worker's own that runs no task, watched by a keeper.

``link`` is the worker's side, ``keeper`` the keeper's, ``serve`` the heartbeat process's,
and ``wire`` every message between them.
"""

from __future__ import annotations

from .link import HeartbeatProcess, supported
from .serve import warm_up

__all__ = ["HeartbeatProcess", "supported", "warm_up"]
