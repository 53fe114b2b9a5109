"""Datadog's ddtrace in a real worker: its beats make no span, in prefork (the main
process beats) and in a threads worker (its heartbeat process beats)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ..conftest import Scenario
from .test_observability_integration import heartbeat_conf, spans_of_a_long_task

pytestmark = [
    pytest.mark.timeout(120),
    # Looked up, never imported here: ddtrace would patch the tests' own process.
    pytest.mark.skipif(importlib.util.find_spec("ddtrace") is None, reason="no ddtrace"),
]

#: ddtrace's own settings for the test's workers: no agent, no telemetry, quiet.
DD_ENV = {
    "DD_TRACE_AGENT_URL": "http://127.0.0.1:9",
    "DD_INSTRUMENTATION_TELEMETRY_ENABLED": "false",
    "DD_REMOTE_CONFIGURATION_ENABLED": "false",
    "DD_TRACE_STARTUP_LOGS": "false",
}


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_with_ddtrace_patching_botocore_the_beats_make_no_span(
    scenario: Scenario, tmp_path: Path, pool: str
) -> None:
    spans_path = tmp_path / "spans.jsonl"
    conf = heartbeat_conf(scenario, imports=["ddtrace_worker"])
    env = {**DD_ENV, "DD_TEST_SPANS": str(spans_path)}
    spans = spans_of_a_long_task(scenario, conf, pool, env, spans_path)
    resources = {s["resource"] for s in spans}
    assert "sqs.listqueues" in resources, resources  # the user's own call: ddtrace traces
    assert not {r for r in resources if "changemessagevisibility" in r}, resources
