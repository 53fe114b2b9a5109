"""The charts of docs/performance.md, drawn from the same run as its tables.

Each function takes one part of ``make bench``'s results dict (or plain rows of numbers)
and writes one SVG file; :func:`draw` writes them all and returns the Markdown that shows
them. The charts read only the keys they need and tolerate keys they do not know, so a
figure that gains a measurement still draws. Every chart states what was measured (its
subtitle) and on what machine and when (its footer, the ``stamp``).

matplotlib is the ``plots`` extra, imported only when a chart is drawn, with the Agg
backend: files only, no display.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["draw", "lateness", "memory", "overhead", "requests_per_interval"]

#: Colours (colour-blind safe, Okabe-Ito): the heartbeat, what it is compared with, a
#: target, and the heartbeat switched off.
ON = "#0072B2"
OTHER = "#E69F00"
TARGET = "#D55E00"
OFF = "#999999"
#: Width of a chart, inches: the docs' content column shows it at about 100 % (SVG).
WIDTH = 9.0
#: Characters per line of a chart's footer and subtitle before they wrap.
WRAP = 120
#: The punctuality figure's targets, milliseconds (docs/performance.md, figure 4).
LATENESS_P99_TARGET_MS = 1000
#: What the overhead arms are called in the chart, by their key in the results.
ARM_LABELS = {
    "heartbeat": "this package\n(threads worker: 3 handlers)",
    "own": "… of which its three handlers",
    "child": "this package\n(prefork pool child: 2 handlers)",
    "dispatch": "Celery's dispatch alone\n(three empty receivers)",
    "naive": "a thread per task\n(hand-written)",
}
#: Where :func:`draw` writes, relative to docs/, for the Markdown it returns.
IMG = "img"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "celery-sqs-heartbeat", "font.size": 10})
    return plt


def default_stamp() -> str:
    """When and where, for a chart drawn outside ``make bench``."""
    return (
        f"{datetime.date.today().isoformat()}, {os.cpu_count()} cores "
        f"({platform.machine()}, {platform.system()} {platform.release()}), "
        f"Python {platform.python_version()}"
    )


def _figure(
    height: float, title: str, subtitle: str, stamp: str | None
) -> tuple[Any, Any, tuple[float, float]]:
    """A figure with its title, what was measured under it, and when and where at the foot."""
    plt = _pyplot()
    sub = textwrap.wrap(subtitle, WRAP)
    foot = textwrap.wrap(f"Measured by make bench on {stamp or default_stamp()}.", WRAP + 25)
    height += 0.2 * (len(sub) + len(foot))
    fig, ax = plt.subplots(figsize=(WIDTH, height))
    fig.text(0.012, 1 - 0.1 / height, title, fontsize=13, fontweight="bold", va="top")
    fig.text(0.012, 1 - 0.42 / height, "\n".join(sub), fontsize=9.5, color="#333333", va="top")
    fig.text(0.012, 0.08 / height, "\n".join(foot), fontsize=7.5, color="#555555", va="bottom")
    top = 1 - (0.55 + 0.19 * len(sub)) / height
    bottom = (0.12 + 0.15 * len(foot)) / height
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax, (bottom, top)


def _save(fig: Any, rect: tuple[float, float], path: Path) -> Path:
    """Lay the axes out between the title block and the footer, and write the file."""
    bottom, top = rect
    fig.tight_layout(rect=(0, bottom, 1, top))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Date": None} if path.suffix == ".svg" else None, dpi=150)
    _pyplot().close(fig)
    return path


def _finite(values: Iterable[Any]) -> list[float]:
    found = []
    for v in values:
        if isinstance(v, (int, float)) and math.isfinite(v):
            found.append(float(v))
    return found


# -- figure 4: punctuality ---------------------------------------------------------------


def lateness(
    punctuality: Mapping[str, Mapping[str, Any]], path: Path, *, stamp: str | None = None
) -> Path:
    """Beat lateness per scenario ("threads, 4 spinning", ...): every beat where the results
    carry them (``lateness_ms``), with the median, 99th percentile and maximum."""
    plt = _pyplot()
    names = list(punctuality)
    fig, ax, rect = _figure(
        1.6 + 0.62 * len(names),
        "Beat lateness while tasks spin on the CPU",
        "Interval 1 s; each task spins in pure Python in a fresh worker; lateness is from a "
        "beat's due time to SQS's answer. One row per pool and number of spinning tasks.",
        stamp,
    )
    rng = _jitter()
    x_max = float(LATENESS_P99_TARGET_MS)
    for i, name in enumerate(names):
        p = punctuality[name]
        samples = _finite(p.get("lateness_ms", ()))
        if samples:
            ax.scatter(
                samples,
                [i + rng() for _ in samples],
                s=9,
                color=ON,
                alpha=0.35,
                linewidths=0,
                label="a beat" if i == 0 else None,
            )
        marks = [("p50_ms", "|", "black", "median"), ("p99_ms", "D", TARGET, "99th percentile")]
        if not samples:  # with every beat drawn, the rightmost dot is the maximum
            marks.append(("max_ms", "x", "black", "maximum"))
            # Results without every beat: a line from the median to the maximum shows
            # the spread the dots would.
            span = _finite([p.get("p50_ms"), p.get("max_ms")])
            if len(span) == 2:
                ax.plot(span, [i, i], color=OFF, linewidth=2, zorder=1)
        for key, marker, colour, label in marks:
            value = _finite([p.get(key)])
            if value:
                ax.plot(
                    value,
                    [i],
                    marker=marker,
                    color=colour,
                    markersize=11 if marker == "|" else 6,
                    mew=2 if marker != "D" else 1,
                    linestyle="",
                    label=label if i == 0 else None,
                )
        x_max = max([x_max, *samples, *_finite([p.get("max_ms")])])
    ax.axvline(LATENESS_P99_TARGET_MS, color=TARGET, linestyle="--", linewidth=1)
    ax.text(
        LATENESS_P99_TARGET_MS,
        -0.5,
        f"target: 99th percentile ≤ {LATENESS_P99_TARGET_MS} ms ",
        color=TARGET,
        fontsize=8.5,
        va="center",
        ha="right",
    )
    ax.set_yticks(range(len(names)), [_scenario_label(n, punctuality[n]) for n in names])
    ax.set_ylim(len(names) - 0.4, -0.75)
    ax.set_xlim(0, x_max * 1.08)
    ax.set_xlabel("lateness of a beat (ms)")
    ax.grid(axis="x", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), fontsize=8.5, frameon=False, ncol=4)
    plt.setp(ax.get_yticklabels(), fontsize=9)
    return _save(fig, rect, path)


def _scenario_label(name: str, p: Mapping[str, Any]) -> str:
    beats = p.get("beats")
    return f"{name}\n{beats} beats" if isinstance(beats, int) else name


def _jitter() -> Any:
    """Vertical scatter for the dots of one row, the same on every run (no diff noise)."""
    import random

    rng = random.Random(0)
    return lambda: rng.uniform(-0.22, 0.22)


# -- figure 3: SQS requests ----------------------------------------------------------------


def requests_per_interval(
    calls: Mapping[str, Any], path: Path, *, stamp: str | None = None
) -> Path:
    """Requests per interval the heartbeat made for concurrent tasks, against one call per
    beat (``calls``: the bench's figure 3, or at least ``per_interval`` and ``tasks``)."""
    per_interval = [int(n) for n in calls["per_interval"]]
    tasks = int(calls.get("tasks", 0))
    target = calls.get("target_per_interval")
    fewer = calls.get("fewer")
    detail = ""
    if "requests" in calls and "entries" in calls and isinstance(fewer, (int, float)):
        detail = (
            f" In all, {calls['requests']} requests carried {calls['entries']} beats: "
            f"{fewer:.1f}x fewer than one call per beat."
        )
    fig, ax, rect = _figure(
        3.4,
        "SQS requests per interval: batched, against one call per beat",
        f"{tasks} tasks of one threads worker beating together (interval 1 s), "
        f"ChangeMessageVisibility(Batch) requests counted at the server over the "
        f"{len(per_interval)} intervals after the last task started.{detail}",
        stamp,
    )
    xs = list(range(1, len(per_interval) + 1))
    bars = ax.bar(xs, per_interval, color=ON, width=0.6, label="batched (measured)")
    ax.bar_label(bars, fontsize=8.5, padding=2)
    if tasks:
        ax.axhline(tasks, color=OTHER, linewidth=2, label=f"one call per beat: {tasks}")
    if isinstance(target, (int, float)):
        ax.axhline(
            target,
            color=TARGET,
            linestyle="--",
            linewidth=1,
            label=f"target: ≤ {target:g} (one per 10 beats)",
        )
    ax.legend(loc="center right", frameon=False, fontsize=9)
    ax.set_xticks(xs)
    ax.set_xlim(0.4, xs[-1] + 0.6)
    ax.set_ylim(0, max([tasks, *per_interval]) * 1.12)
    ax.set_xlabel("interval after the last task started (1 s each)")
    ax.set_ylabel("requests to SQS")
    return _save(fig, rect, path)


# -- figure 1: overhead per task ---------------------------------------------------------


def overhead(o: Mapping[str, Any], path: Path, *, stamp: str | None = None) -> Path:
    """Time added to one task over the no-receiver baseline, per arm of figure 1: median
    bars, 99th-percentile marks; arms the chart does not know are drawn under their key."""
    plt = _pyplot()
    rows = _overhead_rows(o)
    fig, ax, rect = _figure(
        1.4 + 0.55 * len(rows),
        "What each design adds to one task",
        f"A registered task goes through the worker tracer's steps (prerun, postrun) "
        f"{_count(o.get('samples'))} times per arm, arms interleaved; each arm's time minus "
        "the same steps with no receivers. Bars: median; diamonds: 99th percentile.",
        stamp,
    )
    # Log scale: a thread per task costs tens of times more; a difference at or under zero
    # (noise) is drawn at the floor and labelled with its value.
    floor = 0.1
    for i, (label, p50, p99) in enumerate(rows):
        colour = (
            ON
            if "package" in label or "handlers" in label
            else (OFF if "dispatch" in label else OTHER)
        )
        ax.barh(i, max(p50, floor), color=colour, height=0.55)
        text = f"{p50:.1f} µs"
        if p99 is not None:
            ax.plot([max(p99, floor)], [i], "D", color=TARGET, markersize=6)
            text += f"   (p99 {p99:.1f} µs)"
        ax.text(max(p50, p99 or 0, floor) * 1.25, i, text, va="center", fontsize=9)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    biggest = max([p for _, p50, p99 in rows for p in (p50, p99 or 0)] + [10])
    ax.set_xlim(floor * 5, biggest * 12)
    ax.set_yticks(range(len(rows)), [label for label, _, _ in rows])
    ax.set_ylim(len(rows) - 0.4, -0.6)
    ax.set_xlabel("time added to one task (µs, log scale)")
    ax.grid(axis="x", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    plt.setp(ax.get_yticklabels(), fontsize=9)
    return _save(fig, rect, path)


def _count(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) else "many"


def _overhead_rows(o: Mapping[str, Any]) -> list[tuple[str, float, float | None]]:
    """(label, added p50, added p99 or None) for each arm, known arms first."""
    p50: Mapping[str, float] = o.get("p50") or {}
    p99: Mapping[str, float] = o.get("p99") or {}
    base50, base99 = p50.get("baseline"), p99.get("baseline")

    def added(arm: str, key50: str | None, key99: str | None) -> tuple[float, float | None]:
        if key50 is not None and key50 in o:
            v50 = float(o[key50])
        else:
            v50 = float(p50[arm]) - float(base50 or 0.0)
        if key99 is not None and key99 in o:
            return v50, float(o[key99])
        if arm in p99 and base99 is not None:
            return v50, float(p99[arm]) - float(base99)
        return v50, None

    rows: list[tuple[str, float, float | None]] = []
    known = {
        "heartbeat": ("added_p50_us", "added_p99_us"),
        "own": ("own_p50_us", "own_p99_us"),
        "child": ("child_added_p50_us", "child_added_p99_us"),
        "dispatch": ("dispatch_p50_us", "dispatch_p99_us"),
        "naive": ("naive_added_p50_us", None),
    }
    for arm, (key50, key99) in known.items():
        if key50 in o or arm in p50:
            rows.append((ARM_LABELS[arm], *added(arm, key50, key99)))
    for arm in p50:
        if arm not in known and arm != "baseline":
            rows.append((arm, *added(arm, None, None)))
    return rows


# -- memory --------------------------------------------------------------------------------


def memory(rows: Sequence[Mapping[str, Any]], path: Path, *, stamp: str | None = None) -> Path:
    """PSS per worker process, heartbeat off and on. ``rows``: dicts of ``process``
    ("main" or "child"), ``heartbeat`` ("off" or "on") and ``pss_mb``; several rows for one
    pair are drawn as dots around a bar at their median."""
    from statistics import median

    cells: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        cells.setdefault((str(r["process"]), str(r["heartbeat"])), []).extend(
            _finite([r.get("pss_mb")])
        )
    processes = sorted({p for p, _ in cells}, key=lambda p: (p != "main", p))
    several = any(len(v) > 1 for v in cells.values())
    fig, ax, rect = _figure(
        3.6,
        "Memory per worker process, heartbeat off and on",
        "Proportional set size (PSS: shared pages divided among the processes that share "
        "them) of the worker's main process and of a pool child, the same worker run with "
        "the heartbeat off and on." + (" Bars: median; dots: each sample." if several else ""),
        stamp,
    )
    width = 0.36
    top = 0.0
    for i, process in enumerate(processes):
        for j, (state, colour) in enumerate((("off", OFF), ("on", ON))):
            values = cells.get((process, state), [])
            if not values:
                continue
            x = i + (j - 0.5) * width
            mid = median(values)
            bar = ax.bar(
                x,
                mid,
                width=width * 0.92,
                color=colour,
                label=f"heartbeat {state}" if i == 0 else None,
            )
            ax.bar_label(bar, labels=[f"{mid:.1f} MB"], fontsize=9, padding=2)
            if len(values) > 1:
                ax.scatter([x] * len(values), values, s=12, color="black", zorder=3)
            top = max(top, *values)
    ax.set_xticks(
        range(len(processes)), [f"{p} process" if p in ("main", "child") else p for p in processes]
    )
    ax.set_ylim(0, top * 1.18 or 1)
    ax.set_ylabel("PSS per process (MB)")
    ax.legend(loc="upper right", frameon=False, fontsize=9)
    return _save(fig, rect, path)


# -- all of them, for make bench -----------------------------------------------------------


def draw(results: Mapping[str, Any], directory: Path, stamp: str) -> str:
    """Every chart the results allow, into *directory*; the Markdown showing them.

    A part missing from the results (memory, until the bench measures it) skips its chart,
    and without matplotlib there are no charts, only a line saying how to get them.
    """
    try:
        _pyplot()
    except ImportError:
        return "Charts: not drawn, matplotlib is missing (`pip install -e '.[plots]'`).\n"
    charts: list[tuple[str, str]] = []

    def add(name: str, alt: str, chart: Any, data: Any) -> None:
        chart(data, directory / name, stamp=stamp)
        charts.append((alt, name))

    if results.get("punctuality"):
        add(
            "bench-lateness.svg",
            "Beat lateness by pool and number of spinning tasks, median and 99th percentile, "
            f"against the {LATENESS_P99_TARGET_MS} ms target",
            lateness,
            results["punctuality"],
        )
    if results.get("calls", {}).get("per_interval"):
        add(
            "bench-requests.svg",
            "SQS requests per interval for concurrent tasks, batched, against one call per beat",
            requests_per_interval,
            results["calls"],
        )
    if results.get("overhead"):
        add(
            "bench-overhead.svg",
            "Time each design adds to one task: this package, its handlers, Celery's dispatch "
            "alone, a thread per task",
            overhead,
            results["overhead"],
        )
    if results.get("memory"):
        add(
            "bench-memory.svg",
            "Memory (PSS) per worker process, main and child, heartbeat off and on",
            memory,
            results["memory"],
        )
    return "\n\n".join(f"![{alt}]({IMG}/{name})" for alt, name in charts) + "\n"
