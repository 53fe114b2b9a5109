"""Each measured figure the docs cite says what docs/performance.md says.

docs/performance.md is written by `make bench`; other pages cite a few of its numbers in
their own words. CITES below is the whole mapping: a page, a pattern around the number
(a nearby keyword, tolerant of rewording around it), and the figure of performance.md it
must equal, found by the row's name, never its number. The page's number is compared with
the figure rounded as the page rounds it (its decimals, or a word such as "a tenth").

When `make bench` moves a figure, this names each sentence to change; when a page is
reworded so that a pattern no longer finds its number, this says so too: fix the pattern.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PERFORMANCE = ROOT / "docs" / "performance.md"
#: Fractions the docs write in words.
WORDS = {"half": 2, "third": 3, "quarter": 4, "fifth": 5, "ninth": 9, "tenth": 10}


class Performance:
    """The tables of performance.md: the figures by row name, the cost model by row."""

    def __init__(self, text: str) -> None:
        self.figures: dict[str, list[str]] = {}
        self.cost: dict[str, list[str]] = {}
        table = None
        for line in text.splitlines():
            if not line.startswith("|"):
                table = None
                continue
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if table is None:
                table = self.figures if cells[0] == "figure" else self.cost
                continue
            if set(cells[0]) <= set("-"):
                continue
            table[re.sub(r"^\d+\.\s*", "", cells[0])] = cells

    def figure(self, name: str) -> list[str]:
        """The one figure row whose name (its number left out) holds ``name``."""
        found = [cells for row, cells in self.figures.items() if name in row]
        assert len(found) == 1, f"performance.md: {len(found)} figure rows named {name!r}"
        return found[0]

    def cost_row(self, name: str) -> list[str]:
        found = [cells for row, cells in self.cost.items() if name in row]
        assert len(found) == 1, f"performance.md: {len(found)} cost rows named {name!r}"
        return found[0]


def _number(text: str, pattern: str) -> float:
    found = re.search(pattern, text)
    assert found, f"performance.md: {pattern!r} not in {text!r}"
    return float(found.group(1).replace(",", "").replace("$", ""))


#: What performance.md says, by the name a citation uses.
FIGURES: dict[str, Callable[[Performance], float]] = {
    "scale heartbeats": lambda p: _number(p.figure("Scale: memory per heartbeat")[0], r"\((\d+)\)"),
    "batched, times fewer": lambda p: _number(p.figure("SQS requests, ")[1], r"([\d.]+)x fewer"),
    "requests per task-hour, defaults": lambda p: (
        _number(p.cost_row("one call per beat")[1], r"([\d,]+)") / 1000
    ),
    "requests per 1,000 task-hours, defaults": lambda p: _number(
        p.cost_row("one call per beat")[1], r"([\d,]+)"
    ),
    "US$ per 1,000 task-hours, defaults": lambda p: _number(
        p.cost_row("one call per beat")[2], r"\$([\d.]+)"
    ),
}

#: A number of seconds, a count, or a price, for the cues below.
SECONDS = r"\d+(?:\.\d+)? ?s\b"
COUNT = r"\d[\d,]*"

#: (page, cue, pattern, figure of performance.md). The cue says the page cites the figure
#: at all (a keyword and a number near it); the pattern's group ``v`` is the number. A
#: page whose cue is gone no longer cites the figure (skipped, saying so); one whose cue
#: is there but not the pattern was reworded (a failure: fix the pattern).
CITES: list[tuple[str, str, str, str]] = [
    (
        "docs/how-it-works.md",
        rf"{COUNT} (?:concurrent |in-flight )?heartbeats",
        rf"(?P<v>{COUNT}) (?:concurrent |in-flight )?heartbeats",
        "scale heartbeats",
    ),
    (
        "docs/deploying.md",
        r"(?:half|third|quarter|fifth|ninth|tenth) of (?:that|the)",
        r"as little as (?:a|one) (?P<v>half|third|quarter|fifth|ninth|tenth)",
        "batched, times fewer",
    ),
    (
        "docs/deploying.md",
        r"per message-hour",
        r"\((?P<v>\d+) at the defaults\)",
        "requests per task-hour, defaults",
    ),
    (
        "docs/deploying.md",
        r"\(defaults\)",
        r"\(defaults\)\s*(?:\|[^|]*){2}\|\s*(?P<v>\d+)\s*\|",  # the table's last column
        "requests per task-hour, defaults",
    ),
    (
        "docs/deploying.md",
        r"1,000 task-hours",
        r"task-hours at the defaults cost (?P<v>\d{1,3}(?:,\d{3})+) requests",
        "requests per 1,000 task-hours, defaults",
    ),
    (
        "docs/deploying.md",
        r"1,000 task-hours[^.]*\$\d",
        r"requests,? (?:about|roughly|some) (?P<v>\$\d+(?:\.\d+)?)",
        "US$ per 1,000 task-hours, defaults",
    ),
    (
        "docs/troubleshooting.md",
        r"\d+ per task-hour",
        r"(?P<v>\d+) per task-hour at the default interval",
        "requests per task-hour, defaults",
    ),
]


@pytest.fixture(scope="module")
def performance() -> Performance:
    return Performance(PERFORMANCE.read_text(encoding="utf-8"))


def _as_cited(cited: str, figure: float) -> tuple[float, float]:
    """The page's number and the figure rounded as the page rounds it."""
    if cited in WORDS:
        return WORDS[cited], round(figure)
    number = cited.replace(",", "").replace("$", "")
    decimals = len(number.partition(".")[2])
    return float(number), round(figure, decimals)


@pytest.mark.parametrize(("page", "cue", "pattern", "figure"), CITES)
def test_the_page_cites_what_performance_md_measured(
    page: str, cue: str, pattern: str, figure: str, performance: Performance
) -> None:
    text = " ".join((ROOT / page).read_text(encoding="utf-8").split())
    found = [m.group("v") for m in re.finditer(pattern, text)]
    if not found and not re.search(cue, text):
        pytest.skip(f"{page} no longer cites {figure!r}: drop its line from CITES")
    assert found, f"{page} cites {figure!r} ({cue!r}) but not as {pattern!r}: fix the pattern"
    value = FIGURES[figure](performance)
    for cited in found:
        said, measured = _as_cited(cited, value)
        assert said == measured, f"{page} says {cited} where performance.md has {value:g}"


def test_every_figure_is_cited_somewhere() -> None:
    """A figure nobody cites any more is a stale line in FIGURES."""
    assert {figure for *_, figure in CITES} == set(FIGURES)


def test_the_figures_are_found_by_name(performance: Performance) -> None:
    """Each figure parses from performance.md as it is now."""
    for name, read in FIGURES.items():
        assert read(performance) > 0, name
