"""Signals, stats and the two metric recipes of docs/troubleshooting.md, in real workers.

The recipes are the modules in ``examples/``, loaded by the worker through Celery's
``imports`` setting exactly as the docs tell users to.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from celery_sqs_heartbeat.testing import wait_for

from ..conftest import Scenario
from .test_worker_integration import QUEUE_TIMEOUT, TASK_SECONDS

pytestmark = pytest.mark.timeout(120)

INTERVAL = 0.5
VISIBILITY = 2
#: Beats a task of TASK_SECONDS gets at least (one per interval after the first).
MIN_BEATS = int(TASK_SECONDS / INTERVAL / 2)


def heartbeat_conf(scenario: Scenario, **extra: object) -> dict[str, object]:
    return scenario.config(
        queue_timeout=QUEUE_TIMEOUT,
        heartbeat=True,
        interval=INTERVAL,
        visibility=VISIBILITY,
        **extra,
    )


def spans_of_a_long_task(
    scenario: Scenario, conf: dict[str, object], pool: str, env: dict[str, str], spans: Path
) -> list[dict[str, object]]:
    """Run one task long enough for its beats in a worker whose APM writes each span to
    *spans*; the spans, once the task settled and the worker stopped."""
    scenario.start_workers(conf, 1, pool=pool, env=env)
    scenario.send(conf, "sleep", TASK_SECONDS)
    scenario.wait_settled(timeout=TASK_SECONDS + 30)
    scenario.stop()
    beats = [r for r in scenario.beats() if r.status == 200]
    assert len(beats) >= MIN_BEATS
    return [json.loads(line) for line in spans.read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_stats_count_the_running_tasks_beats(scenario: Scenario, pool: str) -> None:
    conf = heartbeat_conf(scenario)
    scenario.start_workers(conf, 1, pool=pool)
    task_id = scenario.send(conf, "stats_after", TASK_SECONDS)

    scenario.wait_settled(timeout=TASK_SECONDS + 30)

    lines = [json.loads(line) for line in scenario.events_path.read_text().splitlines()]
    (event,) = [e for e in lines if e["event"] == "stats" and e["task_id"] == task_id]
    stats = event["stats"]
    assert stats["active"] == 1 and stats["started"] == 1 and stats["stopped"] == 0
    assert stats["beats_sent"] >= MIN_BEATS
    assert stats["failures"] == {} and stats["messages_lost"] == 0


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        sample.name: sample.value + 0.0
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("celery_sqs_heartbeat")
    }


def test_prometheus_recipe_in_a_prefork_worker(scenario: Scenario, tmp_path: Path) -> None:
    """Two tasks in two pool children, added up by the main process's /metrics."""
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    port = free_port()
    conf = heartbeat_conf(scenario, imports=["metrics_prometheus"])
    scenario.start_workers(
        conf,
        1,
        pool="prefork",
        concurrency=2,
        env={
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            "SQS_HEARTBEAT_METRICS_PORT": str(port),
        },
    )
    for _ in range(2):
        scenario.send(conf, "sleep", TASK_SECONDS)

    scenario.wait_settled(timeout=TASK_SECONDS + 30)

    def scraped() -> dict[str, float] | None:
        found = scrape(port)
        done = found.get("celery_sqs_heartbeat_active") == 0
        return found if done else None

    metrics = wait_for(scraped, timeout=10, what="the heartbeats to show as stopped")
    beats = sum(v for k, v in metrics.items() if k == "celery_sqs_heartbeat_beats_total")
    assert beats >= 2 * MIN_BEATS, metrics
    assert metrics["celery_sqs_heartbeat_beat_lateness_seconds_count"] == beats
    assert beats == len([r for r in scenario.beats() if r.status == 200 for _ in _entries(r)])


def _entries(request: object) -> list[object]:
    params = request.params  # type: ignore[attr-defined]
    return list(params.get("Entries", [params]))


def test_cloudwatch_emf_recipe_writes_valid_records(scenario: Scenario) -> None:
    conf = heartbeat_conf(scenario, imports=["metrics_cloudwatch"])
    (worker,) = scenario.start_workers(conf, 1, pool="threads")
    scenario.send(conf, "sleep", TASK_SECONDS)

    scenario.wait_settled(timeout=TASK_SECONDS + 30)

    records = [json.loads(line) for line in worker.log_lines('{"_aws":')]
    assert len(records) >= MIN_BEATS
    for record in records:
        (directive,) = record["_aws"]["CloudWatchMetrics"]
        assert directive["Namespace"] == "CelerySQSHeartbeat"
        assert directive["Dimensions"] == [["Queue"]]
        assert record["Queue"] == scenario.queue
        assert isinstance(record["_aws"]["Timestamp"], int)
        for metric in directive["Metrics"]:
            assert isinstance(record[metric["Name"]], (int, float))
            assert metric["Unit"] in {"Count", "Seconds"}
    assert {m["Name"] for r in records for m in r["_aws"]["CloudWatchMetrics"][0]["Metrics"]} == {
        "Beats",
        "BeatLateness",
    }
