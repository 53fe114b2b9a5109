"""Unit tests run in this process: each starts from a process that serves nothing."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from celery_sqs_heartbeat import _handlers


@pytest.fixture(autouse=True)
def fresh_process() -> Iterator[None]:
    """After each test: the handlers disconnected, this process's role back to one that
    serves nothing (its sidecar or heartbeat process stopped), and every once-only log line
    ready to be said again."""
    yield
    _handlers.disconnect()
