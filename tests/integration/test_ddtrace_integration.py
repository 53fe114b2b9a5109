"""Datadog's ddtrace in a real worker: its beats make no span, in prefork (the main
process beats) and in a threads worker (its heartbeat process beats)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from ..conftest import Scenario
from .test_observability_integration import MIN_BEATS, TASK_SECONDS, heartbeat_conf

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
    scenario.start_workers(conf, 1, pool=pool, env=env)
    scenario.send(conf, "sleep", TASK_SECONDS)
    scenario.wait_settled(timeout=TASK_SECONDS + 30)
    scenario.stop()

    beats = [r for r in scenario.beats() if r.status == 200]
    assert len(beats) >= MIN_BEATS
    spans = [json.loads(line) for line in spans_path.read_text().splitlines()]
    resources = {s["resource"] for s in spans}
    assert "sqs.listqueues" in resources, resources  # the user's own call: ddtrace traces
    assert not {r for r in resources if "changemessagevisibility" in r}, resources
