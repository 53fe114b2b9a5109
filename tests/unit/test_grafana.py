"""The Grafana dashboard in examples/ queries only what the Prometheus recipe exports.

The recipe's metric definitions are read from its source (no import: importing it would
connect its signal handlers in the test process) and re-created in a registry of their
own, so the exported sample names, with the suffixes prometheus-client adds (``_total``,
``_bucket``, ``_count``, ``_sum``, ...), come from prometheus-client itself.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import prometheus_client
import pytest

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "examples" / "metrics_prometheus.py"
DASHBOARD = ROOT / "examples" / "grafana_dashboard.json"
#: The metric classes a recipe may define.
KINDS = frozenset({"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"})
#: Labels Prometheus adds when it scrapes, so a query may use them on any metric.
SCRAPE_LABELS = frozenset({"instance", "job"})
#: PromQL words that look like names but are not metrics.
KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
    | {"and", "or", "unless", "inf", "nan"}
)
#: The families the issue asks the dashboard to show, by the recipe's names.
FAMILIES = {
    "celery_sqs_heartbeat_active": "active heartbeats",
    "celery_sqs_heartbeat_beats": "beats per second",
    "celery_sqs_heartbeat_beat_lateness_seconds": "lateness",
    "celery_sqs_heartbeat_beat_failures": "failures by class",
    "celery_sqs_heartbeat_messages_lost": "lost messages",
    "celery_sqs_heartbeat_messages_redelivered": "redelivered messages",
}


def _literal(node: ast.AST) -> Any:
    return ast.literal_eval(node)


def recipe_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Family name -> (metric class, label names), from the recipe's source."""
    found = {}
    for node in ast.walk(ast.parse(RECIPE.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            continue
        if node.func.id not in KINDS or not node.args:
            continue
        name = _literal(node.args[0])
        labels: tuple[str, ...] = ()
        if len(node.args) > 2:
            labels = tuple(_literal(node.args[2]))
        for kw in node.keywords:
            if kw.arg == "labelnames":
                labels = tuple(_literal(kw.value))
        found[name] = (node.func.id, labels)
    return found


def exported() -> dict[str, set[str]]:
    """Every sample name the recipe's metrics expose -> the labels it carries."""
    registry = prometheus_client.CollectorRegistry()
    for name, (kind, labels) in recipe_metrics().items():
        metric = getattr(prometheus_client, kind)(name, "doc", labels, registry=registry)
        if labels:  # a labelled metric exposes nothing until it has a child
            metric.labels(*("x" for _ in labels))
    samples: dict[str, set[str]] = {}
    for family in registry.collect():
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


def queries() -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every query of the dashboard: panels and template variables."""
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", ()):
            yield f"panel {panel['title']!r}", target["expr"]
    for variable in dashboard.get("templating", {}).get("list", ()):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        match = re.fullmatch(r"\s*label_values\(\s*([^,)]+)\s*,\s*(\w+)\s*\)\s*", query or "")
        if variable.get("type") == "query" and match:
            # label_values(metric, label) as the PromQL selector it stands for.
            yield f"variable {variable['name']!r}", f"group by ({match[2]}) ({match[1]})"


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, keywords or labels)."""
    expr = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", expr):
        if expr[match.end() :].lstrip().startswith("("):
            continue  # a function call
        if match.group().lower() not in KEYWORDS:
            names.add(match.group())
    return names


def label_names(expr: str) -> set[str]:
    """Labels an expression groups by or matches on."""
    names = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        names.update(n.strip() for n in group.split(",") if n.strip())
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        names.update(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    return names


def test_the_recipe_defines_every_family_the_dashboard_shows() -> None:
    """Guards the source parser: it finds the recipe's six metrics and their labels."""
    metrics = recipe_metrics()
    assert set(FAMILIES) <= set(metrics)
    assert metrics["celery_sqs_heartbeat_beat_failures"] == ("Counter", ("failure",))


def test_metric_names_reads_promql() -> None:
    """The expression reader keeps metrics and drops functions, labels, ranges, keywords."""
    expr = (
        'histogram_quantile(0.99, sum by (le, queue) (rate(a_bucket{instance=~"$i"}'
        "[$__rate_interval]))) / ignoring(x) b_total offset 5m and on (job) c"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}
    assert label_names(expr) == {"le", "queue", "instance", "x", "job"}


def test_every_queried_metric_is_one_the_recipe_exports() -> None:
    samples = exported()
    found = list(queries())
    assert found, "the dashboard has no query"
    for where, expr in found:
        names = metric_names(expr)
        unknown = names - set(samples)
        assert not unknown, f"{where} queries {sorted(unknown)}, not exported by the recipe"
        # prometheus-client's multiprocess mode, the recipe's prefork setting, drops these.
        assert not [n for n in names if n.endswith("_created")], where


def test_every_label_used_is_one_the_metric_has() -> None:
    samples = exported()
    for where, expr in queries():
        allowed = set(SCRAPE_LABELS)
        for name in metric_names(expr):
            allowed |= samples[name]
        unknown = label_names(expr) - allowed
        assert not unknown, f"{where} uses labels {sorted(unknown)} its metrics do not have"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_dashboard_shows_each_family(family: str) -> None:
    """Active heartbeats, beats, lateness, failures by class, lost and redelivered
    messages: each queried."""
    names = {name for _, expr in queries() for name in metric_names(expr)}
    assert any(n == family or n.startswith(family + "_") for n in names), FAMILIES[family]


def test_panels_use_the_datasource_variable() -> None:
    """Imported as is, the dashboard asks which Prometheus to use instead of a fixed uid."""
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
