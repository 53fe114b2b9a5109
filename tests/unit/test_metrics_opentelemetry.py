"""examples/metrics_opentelemetry.py with the real SDK: what each signal records, and that
through OpenTelemetry's Prometheus exporter it is the Prometheus recipe's series.

The recipe is imported once into this process (it connects to the package's signals and
records through the global meter provider, which this module sets); each test reads
what its own signals added.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")
pytest.importorskip("opentelemetry.exporter.prometheus")

import prometheus_client
from opentelemetry import metrics
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from celery_sqs_heartbeat import signals

from ..conftest import EXAMPLES
from .test_grafana import exported

pytestmark = pytest.mark.timeout(30)

QUEUE_URL = "https://sqs.us-east-1.amazonaws.com/123456789012/videos"
COMMON = {
    "task_name": "proj.transcode",
    "task_id": "t-1",
    "receipt_handle": "rh-1",
    "queue_url": QUEUE_URL,
}


@pytest.fixture(scope="module")
def readers() -> Iterator[tuple[InMemoryMetricReader, prometheus_client.CollectorRegistry]]:
    memory = InMemoryMetricReader()
    registry = prometheus_client.CollectorRegistry()
    prometheus = PrometheusMetricReader(
        disable_target_info=True, scope_info_enabled=False, registry=registry
    )
    provider = MeterProvider(metric_readers=[memory, prometheus])
    metrics.set_meter_provider(provider)
    if metrics.get_meter_provider() is not provider:
        pytest.skip("another meter provider was set in this process first")
    name = "metrics_opentelemetry"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
        assert spec is not None and spec.loader is not None
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    yield memory, registry


def points(reader: InMemoryMetricReader) -> dict[tuple[str, tuple[tuple[str, Any], ...]], Any]:
    """(metric name, attributes) -> its point, for the recipe's metrics."""
    data = reader.get_metrics_data()
    found = {}
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    found[metric.name, tuple(sorted(point.attributes.items()))] = point
    return found


def one_heartbeat() -> None:
    """What a heartbeat of three beats, one failure and a lost message sends."""
    signals.heartbeat_started.send(sender=None, interval=30, visibility_timeout=120, **COMMON)
    signals.beat_sent.send(sender=None, beats=1, visibility_timeout=120, lateness=0.02, **COMMON)
    # The other beats come from the heartbeat's pool threads.
    thread = threading.Thread(
        target=lambda: [
            signals.beat_sent.send(
                sender=None, beats=n, visibility_timeout=120, lateness=0.3, **COMMON
            )
            for n in (2, 3)
        ]
    )
    thread.start()
    thread.join()
    signals.beat_failed.send(
        sender=None, failure="denied", detail="AccessDenied", retry_in=None, **COMMON
    )
    signals.message_lost.send(sender=None, reason="denied", **COMMON)
    signals.heartbeat_stopped.send(sender=None, reason="denied", beats=3, **COMMON)
    signals.message_redelivered.send(sender=None, message_id="m", receive_count=2, **COMMON)


def test_each_signal_is_recorded_like_the_prometheus_recipe_does(readers: Any) -> None:
    memory, _ = readers
    before = points(memory)

    signals.heartbeat_started.send(sender=None, interval=30, visibility_timeout=120, **COMMON)
    assert points(memory)["celery_sqs_heartbeat.active", ()].value == 1 + _value(
        before, "celery_sqs_heartbeat.active", ()
    )
    signals.heartbeat_stopped.send(sender=None, reason="task ended", beats=0, **COMMON)
    one_heartbeat()

    after = points(memory)

    def added(name: str, attributes: tuple[tuple[str, Any], ...] = ()) -> float:
        return _value(after, name, attributes) - _value(before, name, attributes)

    assert added("celery_sqs_heartbeat.active") == 0
    assert added("celery_sqs_heartbeat.beats", (("queue", "videos"),)) == 3
    assert added("celery_sqs_heartbeat.beat.failures", (("failure", "denied"),)) == 1
    assert added("celery_sqs_heartbeat.messages.lost", (("reason", "denied"),)) == 1
    assert added("celery_sqs_heartbeat.messages.redelivered", (("queue", "videos"),)) == 1
    lateness = after["celery_sqs_heartbeat.beat.lateness", ()]
    assert lateness.count - _count(before) == 3
    assert list(lateness.explicit_bounds) == [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]


def test_through_the_prometheus_exporter_it_is_the_prometheus_recipes_series(
    readers: Any,
) -> None:
    """Same sample names and labels, so the Grafana dashboard and alerts apply as they
    are (prometheus-client's ``_created`` samples aside)."""
    _, registry = readers
    one_heartbeat()

    samples: dict[str, set[str]] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.startswith("celery_sqs_heartbeat"):
                samples.setdefault(sample.name, set()).update(sample.labels)

    expected = {n: labels for n, labels in exported().items() if not n.endswith("_created")}
    assert samples == expected


def _value(found: dict[Any, Any], name: str, attributes: tuple[tuple[str, Any], ...]) -> float:
    point = found.get((name, attributes))
    return 0 if point is None else float(point.value)


def _count(found: dict[Any, Any]) -> int:
    point = found.get(("celery_sqs_heartbeat.beat.lateness", ()))
    return 0 if point is None else int(point.count)
