"""OpenTelemetry: the heartbeat's SQS calls make no spans, and the metrics recipe.

With the real SDK, an in-memory span exporter, botocore's and urllib3's instrumentations
switched on in this process, and SQS calls to the session's real endpoint. Each test that
says "no span" has a twin showing the same call does make one where it should, so a
broken instrumentation cannot pass for a working suppression.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")
pytest.importorskip("opentelemetry.instrumentation.botocore")
pytest.importorskip("opentelemetry.instrumentation.urllib3")

from opentelemetry.instrumentation.botocore import BotocoreInstrumentor
from opentelemetry.instrumentation.urllib3 import URLLib3Instrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from celery_sqs_heartbeat import _quiet
from celery_sqs_heartbeat._send import Sender

from ..conftest import SQS, hold_messages

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
VISIBILITY = 60


@pytest.fixture(scope="module")
def tracing() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """botocore's and urllib3's instrumentations on, for the whole process, as
    ``opentelemetry-instrument`` would set them; spans kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    BotocoreInstrumentor().instrument(tracer_provider=provider)
    URLLib3Instrumentor().instrument(tracer_provider=provider)
    yield provider, exporter
    URLLib3Instrumentor().uninstrument()
    BotocoreInstrumentor().uninstrument()


@pytest.fixture
def held(sqs: SQS, tracing: tuple[TracerProvider, InMemorySpanExporter]) -> Iterator[Any]:
    """A client, a fresh queue and two received messages; no span recorded yet."""
    client = sqs.client()
    url, handles = hold_messages(client, "otel")
    tracing[1].clear()
    yield client, url, handles
    client.delete_queue(QueueUrl=url)


def beat(client: Any, url: str, handles: list[str]) -> None:
    """What the heartbeat does: one batch and one single call, from one of its pool
    threads (no trace, no span: a thread of the sidecar's executor)."""
    sender = Sender(lambda _: client)
    with ThreadPoolExecutor(1) as executor:
        batch = executor.submit(sender.send, url, [(h, VISIBILITY) for h in handles]).result()
        single = executor.submit(sender.send, url, [(handles[0], VISIBILITY)]).result()
    assert [a.failure for a in batch + single] == [None, None, None]


def names(spans: tuple[ReadableSpan, ...]) -> list[str]:
    return [s.name for s in spans]


def test_the_heartbeats_calls_make_no_spans_while_the_users_own_do(
    held: Any, tracing: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    client, url, handles = held
    exporter = tracing[1]

    beat(client, url, handles)
    assert names(exporter.get_finished_spans()) == []  # neither botocore's nor urllib3's

    # The same call by the user's own code, from the same kind of thread, still is one.
    with ThreadPoolExecutor(1) as executor:
        executor.submit(
            client.change_message_visibility,
            QueueUrl=url,
            ReceiptHandle=handles[0],
            VisibilityTimeout=VISIBILITY,
        ).result()
    (span,) = exporter.get_finished_spans()
    assert span.name == "SQS.ChangeMessageVisibility" and span.parent is None


def test_without_the_suppression_the_same_beats_are_root_spans(
    held: Any,
    tracing: tuple[TracerProvider, InMemorySpanExporter],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The twin: proves the instrumentation sees the heartbeat's calls at all."""
    client, url, handles = held
    monkeypatch.setattr(_quiet, "quiet", contextlib.nullcontext)

    beat(client, url, handles)

    spans = tracing[1].get_finished_spans()
    assert names(spans) == ["SQS.ChangeMessageVisibilityBatch", "SQS.ChangeMessageVisibility"]
    assert all(s.parent is None for s in spans)  # each one a trace of its own


def test_a_tasks_own_extend_inside_its_span_is_a_child_span(
    held: Any, tracing: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """A task's ``extend()`` runs on the task's time, in its trace: it stays visible."""
    client, url, handles = held
    provider, exporter = tracing

    with provider.get_tracer("test").start_as_current_span("run/proj.transcode") as task:
        assert Sender(lambda _: client).send(url, [(handles[0], VISIBILITY)])[0].failure is None

    call, task_span = exporter.get_finished_spans()
    assert call.name == "SQS.ChangeMessageVisibility"
    assert call.parent is not None and call.parent.span_id == task.get_span_context().span_id
    assert task_span.name == "run/proj.transcode"


def test_the_suppression_never_raises(
    tracing: tuple[TracerProvider, InMemorySpanExporter], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> Any:
        raise RuntimeError("an OpenTelemetry that changed")

    from opentelemetry import context
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    before = context.get_current()
    monkeypatch.setattr(_quiet, "_otel", ((suppress_instrumentation, broken), lambda: False))
    with _quiet.quiet():
        assert context.get_current() == before  # the first one undone, not left attached
    monkeypatch.setattr(_quiet, "_otel", ((), broken))
    with _quiet.quiet():
        pass


def test_without_opentelemetry_nothing_is_imported(tmp_path: Path) -> None:
    """Where nothing loaded OpenTelemetry, a send neither imports nor looks for it."""
    script = """
import sys
from celery_sqs_heartbeat import _quiet
from celery_sqs_heartbeat._send import Sender
def client(_):
    raise RuntimeError("no client")  # send() still goes through quietly()
assert Sender(client).send("q", [("h", 1)])[0].failure
assert _quiet.quiet() is _quiet._NOTHING and _quiet._otel is None
print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stderr
