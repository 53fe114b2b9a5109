"""The guard every handler runs under, and the log line said once per process.

An error in a handler must never reach Celery or the task, and must be said once, not
at every message: both are here so that every module of the Celery side uses the same.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("celery_sqs_heartbeat")

_noted: set[str] = set()


def note_once(key: str, level: int, message: str, *args: object, exc_info: Any = None) -> None:
    """Log *message* the first time *key* is noted in this process."""
    if key not in _noted:
        _noted.add(key)
        logger.log(level, message, *args, exc_info=exc_info)


def forget_notes() -> None:
    """Say everything again (``uninstall``, tests)."""
    _noted.clear()


class Guard:
    """The one guard of every handler: an error inside is logged once and never reaches
    Celery or the task, which runs on without a heartbeat. (``SystemExit`` is no
    ``Exception``: a bad setting still stops the worker.)"""

    __slots__ = ("_what",)

    def __init__(self, what: str) -> None:
        self._what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: Any, trace: Any) -> bool:
        if kind is None or not issubclass(kind, Exception):
            return False
        self.failed(error)
        return True

    def failed(self, error: Exception) -> None:
        """Say *error* once. For the handlers of every message, which guard with
        ``try``/``except Exception`` (free when nothing is raised; a ``with`` block
        costs two calls)."""
        note_once(
            self._what,
            logging.ERROR,
            "celery-sqs-heartbeat: could not %s; tasks run on.",
            self._what,
            exc_info=error,
        )
