"""Loaded by a test worker through ``imports``: OpenTelemetry tracing in its main
process, botocore instrumented as ``opentelemetry-instrument`` would do it, every span
appended to the file ``OTEL_TEST_SPANS`` names, one JSON line each, as it ends.

At ``worker_ready`` it makes one SQS call of its own, as user code would, so the test
can tell "no beat span" from "no span at all".
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from celery import signals
from opentelemetry.instrumentation.botocore import BotocoreInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

PATH = os.environ["OTEL_TEST_SPANS"]


class FileExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with open(PATH, "a") as f:
            for span in spans:
                record = {
                    "name": span.name,
                    "trace_id": f"{span.context.trace_id:032x}",
                    "parent": None if span.parent is None else f"{span.parent.span_id:016x}",
                    "thread": threading.current_thread().name,
                }
                f.write(json.dumps(record) + "\n")
        return SpanExportResult.SUCCESS


provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(FileExporter()))
BotocoreInstrumentor().instrument(tracer_provider=provider)


@signals.worker_ready.connect
def _users_own_call(**_: Any) -> None:
    import boto3

    broker = urlsplit(os.environ.get("SQSHB_BROKER_URL", ""))
    endpoint = f"http://{broker.hostname}:{broker.port}" if broker.hostname else None
    boto3.client("sqs", endpoint_url=endpoint).list_queues()
