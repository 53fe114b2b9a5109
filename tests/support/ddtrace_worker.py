"""Loaded by a test worker through ``imports``: Datadog's ddtrace patching botocore in
its main process (and so in every process it forks), every finished span appended to
the file ``DD_TEST_SPANS`` names, one JSON line each, and none sent anywhere.

At ``worker_ready`` it makes one SQS call of its own, as user code would, so the test
can tell "no beat span" from "no span at all".
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import urlsplit

from celery import signals
from ddtrace import patch
from ddtrace.trace import TraceFilter, tracer

PATH = os.environ["DD_TEST_SPANS"]


class ToFile(TraceFilter):  # type: ignore[misc]
    """Writes each span of a finished trace, and keeps the trace from the agent."""

    def process_trace(self, trace: list[Any]) -> None:
        lines = "".join(
            json.dumps({"name": s.name, "resource": s.resource, "pid": os.getpid()}) + "\n"
            for s in trace
        )
        fd = os.open(PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, lines.encode())
        finally:
            os.close(fd)


patch(botocore=True)
tracer.configure(trace_processors=[ToFile()])


@signals.worker_ready.connect
def _users_own_call(**_: Any) -> None:
    import boto3

    broker = urlsplit(os.environ.get("SQSHB_BROKER_URL", ""))
    endpoint = f"http://{broker.hostname}:{broker.port}" if broker.hostname else None
    boto3.client("sqs", endpoint_url=endpoint).list_queues()
