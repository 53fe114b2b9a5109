"""The two diagrams of docs/how-it-works.md, drawn as plain SVG: no dependency, no network.

``python -m benchmarks.diagrams`` writes ``docs/img/beat-sequence.svg`` (the life of one
beat: SQS, kombu, the heartbeat thread, the task) and ``docs/img/processes.svg`` (the
processes of a worker, the seams between them and the modules that hold each part).
They live here, beside the bench's charts, because the docs folder is published as it
is; tests/unit/test_diagrams.py checks that the committed files are what this script draws.

The output is deterministic: the same labels give the same bytes. Text widths are
estimated (no font is measured), so every label is wrapped to fit its box with room to
spare. The labels are data, at the top: when a module moves, change its name in
``PROCESSES`` and run the script again.
"""

from __future__ import annotations

import math
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

__all__ = ["PROCESSES", "SEQUENCE", "draw", "processes", "sequence"]

ROOT = Path(__file__).resolve().parent.parent
IMG = ROOT / "docs" / "img"

# -- the labels ------------------------------------------------------------------------

#: The sequence diagram: its participants, left to right (key, name, where it runs),
#: then its steps: ("call" | "answer", from, to, text), or ("note", over, text).
SEQUENCE: dict[str, list[tuple[str, ...]]] = {
    "participants": [
        ("SQS", "SQS", ""),
        ("K", "kombu", "worker main process"),
        ("W", "heartbeat thread", "main process"),
        ("T", "task", "pool child or thread"),
    ],
    "steps": [
        ("call", "K", "SQS", "ReceiveMessage"),
        ("answer", "SQS", "K", "message, ReceiptHandle (hidden for the queue's timeout)"),
        ("call", "K", "W", "task_received: beat this message until it is settled"),
        ("call", "K", "T", "run the task"),
        ("answer", "T", "W", 'task_prerun: "running" (its slot, in a prefork child)'),
        ("note", "W", "one interval after the receipt, on the beats' grid"),
        ("call", "W", "SQS", "ChangeMessageVisibility(Batch) (VisibilityTimeout = window)"),
        ("note", "W", "... every interval, batched per queue ..."),
        ("answer", "T", "W", 'task_postrun: "ended" (waits at most 0.25 s for a beat in flight)'),
        ("call", "K", "SQS", "DeleteMessage (ack) or requeue"),
    ],
}

#: The processes of a worker and their seams. Each part is (what it is, its module).
PROCESSES: dict[str, dict[str, Any]] = {
    "prefork": {
        "title": "Prefork worker",
        "main": (
            "main process",
            [
                ("signal handlers", "_handlers"),
                ("its role", "_roles"),
                ("the sidecar: one loop thread, up to 4 sender threads", "_sidecar"),
                ("its calls to SQS", "_send"),
            ],
        ),
        "children": (
            "pool children",
            [("their role", "_roles"), ("the task side", "_tasks")],
        ),
        "slots": (
            "the slots",
            "_slots",
            "shared memory mapped before the fork: each child writes its slot when its "
            "task starts and ends; the main process reads it before each beat",
        ),
    },
    "threads": {
        "title": "Threads, solo, gevent or eventlet worker",
        "beat": (
            "heartbeat process",
            "_beat/serve.py",
            [("runs a sidecar", "_sidecar"), ("its calls to SQS", "_send")],
        ),
        "keeper": (
            "keeper process",
            "_beat/keeper.py",
            [("forks the heartbeat process and supervises it", "")],
        ),
        "main": (
            "main process",
            [
                ("signal handlers", "_handlers"),
                ("its role", "_roles"),
                ("the task side", "_tasks"),
                ("the link thread", "_beat/link.py"),
            ],
        ),
        "wire": (
            "socket pairs: two main ↔ keeper, one keeper ↔ heartbeat process",
            "_beat/wire.py",
        ),
        "slots": ("the slots: the tasks write them, the heartbeat process reads them", "_slots"),
    },
    "beats": {
        "title": "One interface beats, in every worker",
        "interface": ("the thing that beats", "_beats.Beats"),
        "implemented": [
            ("its own sidecar", "_beats.LocalBeats"),
            ("heartbeat process", "_beat.HeartbeatProcess"),
        ],
        "users": [("the shutdown drain", "_drain"), ("the roles", "_roles")],
        "celery": ("Celery's internals are read in one module", "_celery"),
    },
}

# -- drawing ---------------------------------------------------------------------------

WIDTH = 800
SANS = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif"
MONO = "ui-monospace, SFMono-Regular, Menlo, Consolas, 'Liberation Mono', monospace"
#: Dark text and lines on light fills.
INK = "#1f2328"
LINE = "#57606a"
PAPER = "#ffffff"
BOX = "#f6f8fa"
ACTOR = "#ddf4ff"
NOTE = "#fff8c5"
SEAM = "#6639ba"
#: Font sizes, px, and the estimated width of one character (a fraction of the size).
SIZE = 13
SMALL = 12
SANS_CHAR = 0.52
MONO_CHAR = 0.6
LEADING = 1.3


def _n(value: float) -> str:
    """A coordinate, the same text for the same value."""
    return f"{value:.1f}".rstrip("0").rstrip(".")


def _wrap(text: str, width: float, size: float = SIZE, char: float = SANS_CHAR) -> list[str]:
    return textwrap.wrap(text, max(8, math.floor(width / (size * char)))) or [""]


class _Svg:
    def __init__(self, title: str, desc: str) -> None:
        self.parts: list[str] = []
        self.title, self.desc = title, desc

    def add(self, element: str) -> None:
        self.parts.append(element)

    def rect(self, x: float, y: float, w: float, h: float, fill: str, **extra: str) -> None:
        attrs = "".join(f' {k.replace("_", "-")}="{v}"' for k, v in extra.items())
        self.add(
            f'<rect x="{_n(x)}" y="{_n(y)}" width="{_n(w)}" height="{_n(h)}" rx="6" '
            f'fill="{fill}" stroke="{LINE}"{attrs}/>'
        )

    def text(
        self,
        x: float,
        y: float,
        lines: Sequence[str],
        size: float = SIZE,
        anchor: str = "middle",
        font: str = SANS,
        weight: str = "normal",
        fill: str = INK,
        halo: bool = False,
    ) -> None:
        """Lines of text, the first one's baseline at y; a halo of the paper's colour
        keeps lines behind it from crossing its letters."""
        spans = "".join(
            f'<tspan x="{_n(x)}" dy="{_n(0 if i == 0 else size * LEADING)}">{escape(line)}</tspan>'
            for i, line in enumerate(lines)
        )
        bold = f' font-weight="{weight}"' if weight != "normal" else ""
        head = (
            f'<text x="{_n(x)}" y="{_n(y)}" font-family="{escape(font, {chr(39): "&apos;"})}" '
            f'font-size="{_n(size)}" text-anchor="{anchor}"{bold}'
        )
        if halo:  # a copy underneath, drawn thick in the paper's colour
            self.add(f'{head} fill="{PAPER}" stroke="{PAPER}" stroke-width="5">{spans}</text>')
        self.add(f'{head} fill="{fill}">{spans}</text>')

    def line(
        self,
        points: Sequence[tuple[float, float]],
        stroke: str = LINE,
        dashed: bool = False,
        head: str = "",
        tail: str = "",
        width: float = 1.5,
    ) -> None:
        d = " ".join(f"{_n(x)},{_n(y)}" for x, y in points)
        attrs = ' stroke-dasharray="6 4"' if dashed else ""
        attrs += f' marker-end="url(#{head})"' if head else ""
        attrs += f' marker-start="url(#{tail})"' if tail else ""
        self.add(
            f'<polyline points="{d}" fill="none" stroke="{stroke}" '
            f'stroke-width="{_n(width)}"{attrs}/>'
        )

    def render(self, height: float) -> str:
        markers = "".join(
            f'<marker id="{name}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="8" '
            f'markerHeight="8" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
            f'fill="{colour}"/></marker>'
            for name, colour in (("head", INK), ("seam", SEAM))
        )
        return "\n".join(
            [
                '<?xml version="1.0" encoding="UTF-8"?>',
                f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" '
                f'height="{_n(height)}" viewBox="0 0 {WIDTH} {_n(height)}" role="img" '
                'aria-labelledby="title desc">',
                f'<title id="title">{escape(self.title)}</title>',
                f'<desc id="desc">{escape(self.desc)}</desc>',
                f"<defs>{markers}</defs>",
                f'<rect width="{WIDTH}" height="{_n(height)}" fill="{PAPER}"/>',
                *self.parts,
                "</svg>",
                "",
            ]
        )


# -- the life of one beat --------------------------------------------------------------


def sequence(spec: dict[str, list[tuple[str, ...]]] = SEQUENCE) -> str:
    """The sequence diagram: a lifeline per participant, a row per step."""
    participants = spec["participants"]
    margin, box_w = 20.0, 170.0
    gap = (WIDTH - 2 * margin - box_w) / (len(participants) - 1)
    x = {key: margin + box_w / 2 + i * gap for i, (key, _, _) in enumerate(participants)}
    svg = _Svg(
        "The life of one beat",
        "Sequence: kombu receives a message from SQS and tells the heartbeat thread; the "
        "task runs and tells it when it starts and ends; the heartbeat thread extends the "
        "message's visibility every interval until kombu deletes or requeues it.",
    )
    top, box_h = 12.0, 46.0
    rows: list[tuple[float, tuple[str, ...], list[str]]] = []
    y = top + box_h + 18
    for step in spec["steps"]:
        if step[0] == "note":
            lines = _wrap(step[2], 2 * gap - 40, SMALL)
            height = 16 + len(lines) * SMALL * LEADING
        else:
            span = abs(x[step[1]] - x[step[2]])
            lines = _wrap(step[3], span + 40)  # may run past a lifeline, over a halo
            height = 18 + len(lines) * SIZE * LEADING
        rows.append((y, step, lines))
        y += height
    bottom = y + 4
    for key, name, where in participants:
        svg.line([(x[key], top + box_h), (x[key], bottom)], stroke="#8c959f", dashed=True, width=1)
        svg.rect(x[key] - box_w / 2, top, box_w, box_h, ACTOR)
        if where:
            svg.text(x[key], top + 20, [name], weight="bold")
            svg.text(x[key], top + 37, [f"({where})"], size=SMALL)
        else:
            svg.text(x[key], top + 28, [name], weight="bold")
    for y, step, lines in rows:
        if step[0] == "note":
            w = 2 * gap - 30
            h = 10 + len(lines) * SMALL * LEADING
            cx = x[step[1]]
            svg.rect(cx - w / 2, y, w, h, NOTE)
            svg.text(cx, y + 5 + SMALL, lines, size=SMALL)
            continue
        kind, start, end = step[0], x[step[1]], x[step[2]]
        text_h = len(lines) * SIZE * LEADING
        svg.text((start + end) / 2, y + SIZE, lines, halo=True)
        arrow_y = y + text_h + 5
        inset = 2 if end > start else -2
        svg.line([(start, arrow_y), (end - inset, arrow_y)], dashed=kind == "answer", head="head")
    return svg.render(bottom + 12)


# -- the processes and their seams ------------------------------------------------------


def _parts_height(parts: Sequence[tuple[str, str]], w: float) -> float:
    return sum(_part_lines(label, module, w)[1] for label, module in parts)


def _part_lines(label: str, module: str, w: float) -> tuple[list[str], float]:
    """A part's label, wrapped beside its module name, and the height it takes."""
    room = w - 24 - (len(module) * SMALL * MONO_CHAR + 10 if module else 0)
    lines = _wrap(label, room, SMALL)
    return lines, len(lines) * SMALL * LEADING + 6


def _process(
    svg: _Svg,
    x: float,
    y: float,
    w: float,
    h: float,
    name: str,
    module: str,
    parts: Sequence[tuple[str, str]],
    stacked: bool = False,
) -> None:
    """A process: its name in bold at the top (its module beside it, or under it where
    both do not fit), then a line per part."""
    if stacked:  # several of them
        for offset in (8, 4):
            svg.rect(x + offset, y - offset, w, h, BOX)
    svg.rect(x, y, w, h, BOX)
    svg.text(x + 12, y + 20, [name], anchor="start", weight="bold")
    py = y + 30
    if module and _title_room(name, module) > w - 24:
        svg.text(x + 12, y + 36, [module], size=SMALL, anchor="start", font=MONO)
        py += 16
    elif module:
        svg.text(x + w - 12, y + 20, [module], size=SMALL, anchor="end", font=MONO)
    for label, part_module in parts:
        lines, height = _part_lines(label, part_module, w)
        svg.text(x + 12, py + SMALL, lines, size=SMALL, anchor="start")
        if part_module:
            svg.text(x + w - 12, py + SMALL, [part_module], size=SMALL, anchor="end", font=MONO)
        py += height


def _title_room(name: str, module: str) -> float:
    """The width a process's bold name and its module take on one line."""
    return len(name) * SIZE * (SANS_CHAR + 0.06) + 12 + len(module) * SMALL * MONO_CHAR


def _title_height(name: str, module: str, w: float) -> float:
    return 16 if module and _title_room(name, module) > w - 24 else 0


def _sqs(svg: _Svg, x: float, y: float) -> None:
    svg.rect(x, y, 60, 34, ACTOR)
    svg.text(x + 30, y + 22, ["SQS"], weight="bold")


def processes(spec: dict[str, dict[str, Any]] = PROCESSES) -> str:
    """Two workers' processes, side by side with their seams, then the one interface."""
    svg = _Svg(
        "The processes of a worker and the seams between them",
        "A prefork worker: a main process that beats, pool children that run the tasks, "
        "and the slots between them. A threads, solo, gevent or eventlet worker: a main "
        "process that runs the tasks, a keeper and a heartbeat process, joined by socket pairs "
        "and the slots. Below, the one interface both beat through.",
    )
    pre, thr, beats = spec["prefork"], spec["threads"], spec["beats"]

    # The prefork worker: SQS | main process | the slots | pool children.
    y = 14.0
    svg.text(20, y + 14, [str(pre["title"])], size=15, anchor="start", weight="bold")
    y += 30
    main_name, main_parts = pre["main"]
    kids_name, kids_parts = pre["children"]
    main_x, main_w, kids_x, kids_w = 100.0, 300.0, 604.0, 176.0
    slots_name, slots_module, slots_text = pre["slots"]
    cx = (main_x + main_w + kids_x) / 2
    seam_lines = _wrap(slots_text, kids_x - (main_x + main_w) - 40, 11)
    h = max(
        _parts_height(main_parts, main_w) + 40,
        _parts_height(kids_parts, kids_w) + 40,
        58 + len(seam_lines) * 11 * LEADING + 22,
    )
    _process(svg, main_x, y, main_w, h, main_name, "", main_parts)
    _process(svg, kids_x, y + 8, kids_w, h - 8, kids_name, "", kids_parts, stacked=True)
    _sqs(svg, 20, y + h / 2 - 17)
    svg.line([(main_x, y + h / 2), (82, y + h / 2)], head="head")
    svg.text(cx, y + 22, [slots_name], size=SMALL, fill=SEAM, weight="bold")
    svg.text(cx, y + 37, [slots_module], size=SMALL, fill=SEAM, font=MONO)
    svg.text(cx, y + 54, seam_lines, size=11, fill=SEAM)
    svg.line([(kids_x, y + h - 14), (main_x + main_w + 2, y + h - 14)], stroke=SEAM, head="seam")
    y += h + 22

    # The threads worker: SQS | heartbeat process | keeper | main process.
    svg.text(20, y + 14, [str(thr["title"])], size=15, anchor="start", weight="bold")
    wire_text, wire_module = thr["wire"]
    y += 34
    svg.text(440, y, [wire_text], size=SMALL, fill=SEAM, weight="bold", anchor="end")
    svg.text(448, y, [wire_module], size=SMALL, fill=SEAM, font=MONO, anchor="start")
    y += 26
    beat_name, beat_module, beat_parts = thr["beat"]
    keep_name, keep_module, keep_parts = thr["keeper"]
    tmain_name, tmain_parts = thr["main"]
    boxes = [(100.0, 220.0), (350.0, 170.0), (550.0, 230.0)]
    h = (
        max(
            _parts_height(beat_parts, boxes[0][1])
            + _title_height(beat_name, beat_module, boxes[0][1]),
            _parts_height(keep_parts, boxes[1][1])
            + _title_height(keep_name, keep_module, boxes[1][1]),
            _parts_height(tmain_parts, boxes[2][1]),
        )
        + 40
    )
    wire_y = y - 12
    centres = [bx + bw / 2 for bx, bw in boxes]
    svg.line([(centres[0], wire_y), (centres[2], wire_y)], stroke=SEAM, width=2)
    for c in centres:
        svg.line([(c, wire_y), (c, y - 1)], stroke=SEAM, head="seam", width=2)
    _process(svg, boxes[0][0], y, boxes[0][1], h, beat_name, beat_module, beat_parts)
    _process(svg, boxes[1][0], y, boxes[1][1], h, keep_name, keep_module, keep_parts)
    _process(svg, boxes[2][0], y, boxes[2][1], h, tmain_name, "", tmain_parts)
    _sqs(svg, 20, y + h / 2 - 17)
    svg.line([(boxes[0][0], y + h / 2), (82, y + h / 2)], head="head")
    fork_y = y + h - 16
    svg.line([(boxes[1][0], fork_y), (boxes[0][0] + boxes[0][1] + 2, fork_y)], head="head")
    svg.text((boxes[1][0] + boxes[0][0] + boxes[0][1]) / 2, fork_y - 5, ["forks"], size=10)
    slots_text, slots_module = thr["slots"]
    low = y + h + 16
    svg.line(
        [(centres[2], y + h), (centres[2], low), (centres[0], low), (centres[0], y + h + 2)],
        stroke=SEAM,
        head="seam",
        width=2,
    )
    svg.text(440, low + 17, [slots_text], size=SMALL, fill=SEAM, weight="bold", anchor="end")
    svg.text(448, low + 17, [slots_module], size=SMALL, fill=SEAM, font=MONO, anchor="start")
    y = low + 30

    # The one interface: who implements it, who talks to it; and Celery's internals.
    svg.text(20, y + 14, [str(beats["title"])], size=15, anchor="start", weight="bold")
    y += 30
    face_name, face_module = beats["interface"]
    impl: list[tuple[str, str]] = beats["implemented"]
    users: list[tuple[str, str]] = beats["users"]
    side_w, face_w = 265.0, 160.0
    h = max(_parts_height(impl, side_w), _parts_height(users, side_w)) + 40
    face_x = (WIDTH - face_w) / 2
    _process(svg, 20, y, side_w, h, "implemented by", "", impl)
    _process(svg, WIDTH - 20 - side_w, y, side_w, h, "talk to it", "", users)
    svg.rect(face_x, y + h / 2 - 26, face_w, 52, ACTOR)
    svg.text(WIDTH / 2, y + h / 2 - 5, [face_name], weight="bold")
    svg.text(WIDTH / 2, y + h / 2 + 13, [face_module], size=SMALL, font=MONO)
    svg.line([(20 + side_w, y + h / 2), (face_x - 2, y + h / 2)], dashed=True, head="head")
    svg.line([(WIDTH - 20 - side_w, y + h / 2), (face_x + face_w + 2, y + h / 2)], head="head")
    y += h + 24
    celery_text, celery_module = beats["celery"]
    svg.text(WIDTH / 2 - 4, y, [f"{celery_text}:"], size=SMALL, anchor="end")
    svg.text(WIDTH / 2 + 4, y, [celery_module], size=SMALL, anchor="start", font=MONO)
    return svg.render(y + 16)


def draw(folder: Path = IMG) -> list[Path]:
    """Write both diagrams into ``folder``; return their paths."""
    written = []
    for name, svg in (("beat-sequence.svg", sequence()), ("processes.svg", processes())):
        path = folder / name
        path.write_text(svg, encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for path in draw():
        print(f"written {path.relative_to(ROOT)}")
    sys.exit(0)
