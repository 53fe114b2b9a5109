"""OpenTelemetry in a real worker: its beats make no spans (``otel_worker``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..conftest import Scenario
from .test_observability_integration import heartbeat_conf, spans_of_a_long_task

pytestmark = pytest.mark.timeout(120)


def test_a_real_worker_with_botocore_instrumented_exports_no_beat_spans(
    scenario: Scenario, tmp_path: Path
) -> None:
    """A threads worker whose main process instruments botocore at import (the
    ``otel_worker`` module): kombu's and the user's calls are spans, its beats are not."""
    spans_path = tmp_path / "spans.jsonl"
    conf = heartbeat_conf(scenario, imports=["otel_worker"])
    env = {"OTEL_TEST_SPANS": str(spans_path)}
    spans = spans_of_a_long_task(scenario, conf, "threads", env, spans_path)
    found = {s["name"] for s in spans}
    assert "SQS.ListQueues" in found, found  # the user's own call, at worker_ready
    assert not {n for n in found if "ChangeMessageVisibility" in n}, found
