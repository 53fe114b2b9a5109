"""The diagrams of docs/how-it-works.md: committed as drawn, well-formed, and shown.

benchmarks/diagrams.py draws them from labels it holds as data; these tests keep the
committed SVG files equal to what it draws now, so the two cannot drift, and check that
the page shows them instead of a diagram only a script from a CDN would draw.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from benchmarks import diagrams

ROOT = Path(__file__).resolve().parents[2]
IMG = ROOT / "docs" / "img"
NAMES = ("beat-sequence.svg", "processes.svg")
SVG = "{http://www.w3.org/2000/svg}"


def _texts(svg: str) -> str:
    return " ".join(t.text or "" for t in ET.fromstring(svg).iter(f"{SVG}tspan"))


@pytest.mark.parametrize("name", NAMES)
def test_the_committed_diagram_is_what_the_script_draws(name: str, tmp_path: Path) -> None:
    """Run `python -m benchmarks.diagrams` after changing a label, and commit both."""
    (drawn,) = [p for p in diagrams.draw(tmp_path) if p.name == name]
    assert (IMG / name).read_text(encoding="utf-8") == drawn.read_text(encoding="utf-8")


@pytest.mark.parametrize("name", NAMES)
def test_the_diagram_is_a_well_formed_svg_of_the_docs_width(name: str) -> None:
    root = ET.parse(IMG / name).getroot()
    assert root.tag == f"{SVG}svg"
    assert root.get("width") == str(diagrams.WIDTH)
    assert root.find(f"{SVG}title") is not None and root.find(f"{SVG}desc") is not None


def test_drawing_twice_gives_the_same_bytes() -> None:
    assert diagrams.sequence() == diagrams.sequence()
    assert diagrams.processes() == diagrams.processes()


def test_the_sequence_carries_every_participant_message_and_note() -> None:
    text = _texts(diagrams.sequence())
    words = " ".join(text.split())
    for _, name, where in diagrams.SEQUENCE["participants"]:
        assert name in words and where in words
    for step in diagrams.SEQUENCE["steps"]:
        # wrapped over lines: every word is there, in order
        said = " ".join(step[-1].split())
        assert said in words, said


def test_the_processes_name_every_module_of_their_labels() -> None:
    text = _texts(diagrams.processes())
    for module in (
        "_handlers",
        "_roles",
        "_sidecar",
        "_send",
        "_tasks",
        "_slots",
        "_beat/link.py",
        "_beat/keeper.py",
        "_beat/serve.py",
        "_beat/wire.py",
        "_beats.Beats",
        "_drain",
        "_celery",
    ):
        assert module in text, module


def test_a_label_is_escaped() -> None:
    spec = {**diagrams.SEQUENCE, "steps": [("call", "K", "SQS", 'a < b & "c"')]}
    ET.fromstring(diagrams.sequence(spec))


def test_how_it_works_shows_the_pictures_and_no_mermaid() -> None:
    page = (ROOT / "docs" / "how-it-works.md").read_text(encoding="utf-8")
    assert "```mermaid" not in page
    for name in NAMES:
        assert f"](img/{name})" in page
    assert "mermaid" not in (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
