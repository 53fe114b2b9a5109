"""The demo's timeline and the bench's charts: drawn from made-up results, no worker.

What a picture looks like is checked by looking at it; these tests check that each is
drawn from the data it is given, that results of a new shape still draw, and that a
missing matplotlib only costs the picture.
"""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from benchmarks import charts
from celery_sqs_heartbeat.testing import RecordedRequest, _Recorder

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]


def load_demo() -> ModuleType:
    """examples/demo.py as a module (examples/ is not a package)."""
    name = "sqs_heartbeat_demo"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up while being made
    spec.loader.exec_module(module)
    return module


def is_svg(path: Path) -> bool:
    return ET.parse(path).getroot().tag.endswith("svg")


def results() -> dict[str, Any]:
    """Results of make bench's shape, made up, with a key no chart knows in each part."""
    return {
        "overhead": {
            "own_p50_us": 6.5,
            "own_p99_us": 8.4,
            "dispatch_p50_us": 4.3,
            "dispatch_p99_us": 10.3,
            "samples": 20000,
            "p50": {"baseline": 20.0, "heartbeat": 29.2, "naive": 202.0, "dispatch": 24.3},
            "p99": {"baseline": 40.0, "heartbeat": 82.7, "naive": 400.0, "dispatch": 50.3},
            "added_p50_us": 9.2,
            "added_p99_us": 42.7,
            "naive_added_p50_us": 182.0,
            "cheaper_than_naive": 19.8,
            "something_new": [1, 2],
        },
        "calls": {
            "tasks": 50,
            "intervals": 3,
            "requests": 16,
            "entries": 150,
            "naive_requests": 150,
            "per_interval": [6, 5, 5],
            "max_per_interval": 6,
            "target_per_interval": 5,
            "fewer": 9.4,
        },
        "punctuality": {
            "threads, 1 spinning": {
                "beats": 3,
                "p50_ms": 11.0,
                "p99_ms": 40.0,
                "max_ms": 40.0,
                "lateness_ms": [11.0, 9.0, 40.0],
                "new_figure": "x",
            },
            "prefork, 1 spinning": {"beats": 10, "p50_ms": 12.0, "p99_ms": 127.0, "max_ms": 127.0},
        },
    }


MEMORY = [
    {"process": "main", "heartbeat": "off", "pss_mb": 61.0},
    {"process": "main", "heartbeat": "on", "pss_mb": 62.5},
    {"process": "child", "heartbeat": "off", "pss_mb": 38.0},
    {"process": "child", "heartbeat": "on", "pss_mb": 38.7},
    {"process": "child", "heartbeat": "on", "pss_mb": 39.1},
]


def test_each_chart_writes_an_svg(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    r = results()
    written = [
        charts.lateness(r["punctuality"], tmp_path / "a.svg", stamp="today"),
        charts.requests_per_interval(r["calls"], tmp_path / "b.svg"),
        charts.overhead(r["overhead"], tmp_path / "c.svg", stamp="today"),
        charts.memory(MEMORY, tmp_path / "d.svg"),
    ]
    assert all(is_svg(p) for p in written)


def test_draw_shows_memory_only_when_measured(tmp_path: Path) -> None:
    """The memory chart appears once the bench's results carry memory rows."""
    pytest.importorskip("matplotlib")
    without = charts.draw(results(), tmp_path, "today")
    assert "bench-memory.svg" not in without
    assert not (tmp_path / "bench-memory.svg").exists()
    with_memory = charts.draw({**results(), "memory": MEMORY}, tmp_path, "today")
    for name in ("lateness", "requests", "overhead", "memory"):
        assert f"](img/bench-{name}.svg)" in with_memory
        assert is_svg(tmp_path / f"bench-{name}.svg")


def test_overhead_rows_come_from_the_named_figures_and_new_arms() -> None:
    """The chart shows what the table shows, and an arm the bench adds gets a row."""
    o = results()["overhead"]
    o["p50"] = {**o["p50"], "pooled": 25.0}
    o["p99"] = {**o["p99"], "pooled": 45.0}
    rows = {label: (p50, p99) for label, p50, p99 in charts._overhead_rows(o)}
    assert rows[charts.ARM_LABELS["heartbeat"]] == (9.2, 42.7)
    assert rows[charts.ARM_LABELS["naive"]] == (182.0, 360.0)
    assert rows["pooled"] == (5.0, 5.0)


def test_without_matplotlib_draw_says_how_to_get_the_charts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    note = charts.draw(results(), tmp_path, "today")
    assert "plots" in note
    assert not list(tmp_path.iterdir())


def _events_and_requests(t0: float) -> tuple[list[dict[str, Any]], list[RecordedRequest]]:
    """A run like the demo's: one message received twice (no heartbeat), one beaten."""

    def start(task: str, handle: str, at: float, end: float) -> list[dict[str, Any]]:
        common = {"task": f"demo_tasks.{task}", "worker": "w1", "receipt_handle": handle}
        return [
            {**common, "event": "start", "at": t0 + at},
            {**common, "event": "end", "at": t0 + end},
        ]

    events = [
        *start("transcode_unprotected", "u1", 0.1, 10.1),
        *start("transcode", "p1", 0.1, 10.1),
        *start("transcode_unprotected", "u2", 4.6, 14.6),
    ]

    def req(action: str, at: float, params: dict[str, Any], received: tuple[str, ...] = ()):
        return RecordedRequest(action, params, 200, t0 + at, t0 + at, received)

    requests = [
        req("ReceiveMessage", 0.05, {}, ("u1", "p1")),
        *(
            req("ChangeMessageVisibility", b, {"ReceiptHandle": "p1", "VisibilityTimeout": 4})
            for b in (1.1, 2.1, 3.1, 4.1, 5.1, 6.1, 7.1, 8.1, 9.1, 10.1)
        ),
        req("ReceiveMessage", 4.5, {}, ("u2",)),
        req("DeleteMessage", 10.15, {"ReceiptHandle": "p1"}),
    ]
    return events, requests


def test_timeline_shows_each_receipts_hidden_window() -> None:
    demo = load_demo()
    events, requests = _events_and_requests(t0=1000.0)
    timeline = demo.Timeline.build(events, requests, 1000.0)
    first, second = timeline.runs["transcode_unprotected"]
    (protected,) = timeline.runs["transcode"]
    assert first.hidden == [(pytest.approx(0.05), pytest.approx(4.05), "queue")]
    assert first.visible_again == pytest.approx(4.05)
    assert second.received == pytest.approx(4.5)
    assert protected.visible_again is None
    assert len(protected.beats) == 10
    assert protected.hidden[-1][1] == pytest.approx(10.15)  # cut at the deletion


def test_demo_draws_png_and_svg_and_copies_the_svg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    demo = load_demo()
    monkeypatch.setattr(demo, "DOCS_PICTURE", tmp_path / "docs" / "demo-timeline.svg")
    (tmp_path / "docs").mkdir()
    events, requests = _events_and_requests(t0=0.0)
    demo.draw_and_report(demo.Timeline.build(events, requests, 0.0), tmp_path / "timeline")
    assert is_svg(tmp_path / "timeline.svg")
    assert (tmp_path / "timeline.png").read_bytes()[:4] == b"\x89PNG"
    assert is_svg(tmp_path / "docs" / "demo-timeline.svg")


def test_demo_without_matplotlib_says_how_to_get_the_picture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    demo = load_demo()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(demo, "DOCS_PICTURE", tmp_path / "demo-timeline.svg")
    events, requests = _events_and_requests(t0=0.0)
    demo.draw_and_report(demo.Timeline.build(events, requests, 0.0), tmp_path / "timeline")
    assert demo.NO_PICTURE in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_recorder_keeps_what_a_receive_handed_out() -> None:
    """The timeline's receipts come from the server's answers, which it now records."""
    answer = json.dumps({"Messages": [{"ReceiptHandle": "h1"}, {"ReceiptHandle": "h2"}]})

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [answer.encode()]

    recorder = _Recorder(app)
    environ = {
        "CONTENT_LENGTH": "2",
        "wsgi.input": io.BytesIO(b"{}"),
        "HTTP_X_AMZ_TARGET": "AmazonSQS.ReceiveMessage",
    }
    body = recorder(environ, lambda *a: None)
    assert b"".join(body) == answer.encode()
    (request,) = recorder.requests
    assert request.received == ("h1", "h2")
    assert request.answered >= request.at
