"""The beat process: the beats of a threads, solo, gevent or eventlet worker come from a
small process of the worker's own that runs no task, watched by a keeper.

``link`` is the worker's side, ``keeper`` the keeper's, ``serve`` the beat process's,
and ``wire`` every message between them.
"""

from __future__ import annotations

from .link import BeatProcess, supported
from .serve import warm_up

__all__ = ["BeatProcess", "supported", "warm_up"]
