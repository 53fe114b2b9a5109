"""`make demo`: a long task runs twice without the heartbeat, and once with it.

Starts moto's SQS server on loopback and two real ``celery worker`` processes, sends
the same long "transcode" twice (one with the heartbeat turned off for that task),
and reports as it happens which worker runs what and each beat SQS receives.

Then it draws what happened as a timeline (SVG and PNG, next to the workers' logs, and a
copy of the SVG in docs/img/): one lane per task run, each message's hidden window as SQS
saw it, and the moment the unprotected message became visible again. The picture needs
matplotlib (the ``plots`` extra); without it the demo runs all the same and says so.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery

from celery_sqs_heartbeat.testing import FAKE_AWS_ENV, RecordedRequest, SQSServer, WorkerProcess

HERE = Path(__file__).resolve().parent
#: Where the copy of the picture that the README and the docs show is written.
DOCS_PICTURE = HERE.parent / "docs" / "img" / "demo-timeline.svg"
QUEUE = "transcodes"
QUEUE_TIMEOUT = 4  # the queue's visibility timeout, in seconds
TASK_SECONDS = 10  # each transcode: 2.5 times the queue's timeout
INTERVAL = 1  # sqs_heartbeat_interval
WINDOW = 4  # sqs_heartbeat_visibility_timeout
WORKERS = 2
#: The two tasks, in the order they are sent and drawn, with their heartbeat setting.
TASKS = (("transcode_unprotected", "off"), ("transcode", "on"))
#: Shown when matplotlib is missing: the demo still runs, only the picture is skipped.
NO_PICTURE = (
    "No timeline picture: matplotlib is not installed. "
    "`pip install -e '.[plots]'` (or `make demo`, which installs it) draws one."
)

CONFIG = {
    "task_default_queue": QUEUE,
    "task_acks_late": True,
    "worker_prefetch_multiplier": 1,
    "sqs_heartbeat_enabled": True,
    "sqs_heartbeat_interval": INTERVAL,
    "sqs_heartbeat_visibility_timeout": WINDOW,
    "broker_transport_options": {
        "visibility_timeout": QUEUE_TIMEOUT,
        "wait_time_seconds": 1,
        "polling_interval": 0.1,
    },
}


def say(start: float, text: str) -> None:
    print(f"[{time.time() - start:5.1f}s] {text}", flush=True)


def main() -> int:
    os.environ.update(FAKE_AWS_ENV)
    tmp = Path(tempfile.mkdtemp(prefix="sqs-heartbeat-demo-"))
    runs_path = tmp / "runs.jsonl"
    print(
        f"Queue visibility timeout {QUEUE_TIMEOUT} s; each task runs {TASK_SECONDS} s; "
        f"heartbeat every {INTERVAL} s, each beat hiding the message {WINDOW} s more."
    )
    with SQSServer() as sqs:
        print(f"Embedded SQS (moto) on {sqs.endpoint_url}; starting {WORKERS} workers...")
        workers = [
            WorkerProcess(
                "demo_tasks",
                pool="prefork",
                concurrency=2,
                name=f"worker{i + 1}",
                cwd=HERE,
                log_path=tmp / f"worker{i + 1}.log",
                env={
                    **FAKE_AWS_ENV,
                    "DEMO_BROKER_URL": sqs.broker_url,
                    "DEMO_CONFIG": json.dumps(CONFIG),
                    "DEMO_RUNS": str(runs_path),
                    "DEMO_WORKER": f"worker{i + 1}",
                    "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path]),
                },
            ).start()
            for i in range(WORKERS)
        ]
        start = time.time()
        try:
            for w in workers:
                w.wait_ready(60)
            start = time.time()
            ok = run(sqs, workers, runs_path, start)
        finally:
            # A warm shutdown lets the runs still going finish, so each has its end.
            for w in workers:
                w.stop()
            print(f"Worker logs: {tmp}")
        timeline = Timeline.build(_events(runs_path), sqs.requests(), start)
    # The picture's data, for anyone who wants to check it or draw it another way.
    (tmp / "timeline.json").write_text(json.dumps(asdict(timeline), indent=1))
    draw_and_report(timeline, tmp / "timeline")
    return 0 if ok else 1


def _events(runs_path: Path) -> list[dict[str, Any]]:
    if not runs_path.exists():
        return []
    return [json.loads(line) for line in runs_path.read_text().splitlines()]


def run(sqs: SQSServer, workers: list[WorkerProcess], runs_path: Path, start: float) -> bool:
    sender = Celery("demo", broker=sqs.broker_url)
    sender.conf.update(CONFIG)
    for name, _ in TASKS:
        sender.send_task(f"demo_tasks.{name}", args=[TASK_SECONDS])
        say(start, f"sent {name}")

    seen_runs, seen_beats = 0, 0
    runs: list[dict[str, Any]] = []
    handles: dict[str, str] = {}
    deadline = start + TASK_SECONDS * 3 + 20
    queue_url = sqs.client().get_queue_url(QueueName=QUEUE)["QueueUrl"]
    while time.time() < deadline:
        runs = [e for e in _events(runs_path) if e.get("event", "start") == "start"]
        for i, r in enumerate(runs[seen_runs:], start=seen_runs):
            handles[str(r["receipt_handle"])] = _short(r["task"])
            n = sum(x["task"] == r["task"] for x in runs[: i + 1])
            say(
                start,
                f"{r['worker']} started {_short(r['task'])} (run #{n})"
                + ("  <-- DUPLICATE" if n > 1 else ""),
            )
        seen_runs = len(runs)
        beats = sqs.visibility_changes()
        for b in beats[seen_beats:]:
            for rh in b.receipt_handles:
                say(
                    start,
                    f"beat: SQS hides {handles.get(rh, '?')}'s message "
                    f"{b.params.get('VisibilityTimeout', WINDOW)} s more",
                )
        seen_beats = len(beats)
        attrs = sqs.client().get_queue_attributes(
            QueueUrl=queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        if runs and attrs == {
            "ApproximateNumberOfMessages": "0",
            "ApproximateNumberOfMessagesNotVisible": "0",
        }:
            break
        time.sleep(0.2)

    counts = {name: sum(_short(r["task"]) == name for r in runs) for name, _ in TASKS}
    beats_by_task: dict[str, int] = {}
    for b in sqs.visibility_changes():
        for rh in b.receipt_handles:
            beats_by_task[handles.get(rh, "?")] = beats_by_task.get(handles.get(rh, "?"), 0) + 1
    print()
    print(f"{'task':<24}{'heartbeat':<11}{'runs':<6}beats")
    for name, on in TASKS:
        print(f"{name:<24}{on:<11}{counts[name]:<6}{beats_by_task.get(name, 0)}")
    ok = counts["transcode"] == 1 and counts["transcode_unprotected"] >= 2
    print()
    print(
        "As expected: without the heartbeat the task ran again on a second worker; "
        "with it, exactly once."
        if ok
        else "UNEXPECTED RESULT: see the worker logs."
    )
    return ok


def _short(task: object) -> str:
    return str(task).rsplit(".", 1)[-1]


# -- what SQS saw, per task run ------------------------------------------------------


@dataclass
class Run:
    """One run of a task, and the hidden window of the receipt it ran from.

    Times are seconds since the tasks were sent. ``hidden`` holds the message's hidden
    window as SQS set it, piece by piece: the queue's timeout at receipt, then one piece
    per beat, from where the window stood to the new end the beat asked for.
    """

    task: str
    worker: str
    start: float
    end: float | None
    received: float
    hidden: list[tuple[float, float, str]] = field(default_factory=list)
    beats: list[float] = field(default_factory=list)
    deleted: float | None = None

    @property
    def visible_again(self) -> float | None:
        """When SQS could hand the message out again while this run still held it."""
        if not self.hidden:
            return None
        lapse = self.hidden[-1][1]
        if self.deleted is not None and self.deleted <= lapse:
            return None
        if self.end is not None and self.end <= lapse:
            return None
        return lapse


@dataclass
class Timeline:
    """Every task run of the demo, grouped by task in the order the tasks were sent."""

    runs: dict[str, list[Run]]
    queue_timeout: float = QUEUE_TIMEOUT
    window: float = WINDOW
    interval: float = INTERVAL
    task_seconds: float = TASK_SECONDS

    @classmethod
    def build(
        cls, events: list[dict[str, Any]], requests: list[RecordedRequest], t0: float
    ) -> Timeline:
        """From the tasks' own start/end events and the requests moto answered."""
        received: dict[str, tuple[float, float]] = {}
        for r in requests:
            if r.action == "ReceiveMessage":
                timeout = float(r.params.get("VisibilityTimeout", QUEUE_TIMEOUT))
                for handle in r.received:
                    received[handle] = (r.answered - t0, timeout)
        beats: dict[str, list[tuple[float, float]]] = {}
        deleted: dict[str, float] = {}
        for r in requests:
            if r.status != 200:
                continue
            if r.action == "ChangeMessageVisibility":
                entries = [r.params]
            elif r.action == "ChangeMessageVisibilityBatch":
                entries = list(r.params.get("Entries", ()))
            elif r.action in ("DeleteMessage", "DeleteMessageBatch"):
                for handle in r.receipt_handles:
                    deleted.setdefault(handle, r.at - t0)
                continue
            else:
                continue
            for e in entries:
                beats.setdefault(str(e["ReceiptHandle"]), []).append(
                    (r.at - t0, float(e.get("VisibilityTimeout", WINDOW)))
                )
        ends = {
            str(e["receipt_handle"]): float(e["at"]) - t0 for e in events if e.get("event") == "end"
        }
        runs: dict[str, list[Run]] = {name: [] for name, _ in TASKS}
        for e in events:
            if e.get("event", "start") != "start":
                continue
            handle = str(e["receipt_handle"])
            start = float(e["at"]) - t0
            # A receipt the recorder did not see: the run's start is the closest bound.
            got, timeout = received.get(handle, (start, float(QUEUE_TIMEOUT)))
            run = Run(
                task=_short(e["task"]),
                worker=str(e["worker"]),
                start=start,
                end=ends.get(handle),
                received=got,
                deleted=deleted.get(handle),
            )
            until = got + timeout
            run.hidden.append((got, until, "queue"))
            for at, seconds in sorted(beats.get(handle, ())):
                if until < at:
                    break  # the window had lapsed: the message was out of our hands
                run.beats.append(at)
                run.hidden.append((until, at + seconds, "beat"))
                until = at + seconds
            if run.deleted is not None:
                run.hidden = [
                    (a, min(b, run.deleted), kind) for a, b, kind in run.hidden if a < run.deleted
                ]
            runs.setdefault(run.task, []).append(run)
        for found in runs.values():
            found.sort(key=lambda r: r.start)
        return cls(runs)


# -- the picture -----------------------------------------------------------------------

#: Colours (colour-blind safe, Okabe-Ito): a run that SQS protects, one it does not,
#: the stretch a run is exposed, and the two kinds of hidden window.
RUN_ON = "#0072B2"
RUN_OFF = "#E69F00"
EXPOSED = "#D55E00"
HIDDEN_QUEUE = "#999999"
HIDDEN_BEAT = "#009E73"
#: Lane geometry, in lane units below the lane's top: the hidden-window band, then the
#: run bar under it, then room for the note on what happened next.
LANE = 1.45
BAND = (-0.30, 0.22)  # (bottom, height)
BAR = (-0.68, 0.34)
#: Room above a group's first lane for its heading.
HEADING = 0.75


def draw_and_report(timeline: Timeline, stem: Path) -> None:
    """Draw the timeline next to the logs and copy the SVG into the docs, or say why not."""
    try:
        svg, png = draw_timeline(timeline, stem)
    except ImportError:
        print(NO_PICTURE)
        return
    print(f"Timeline of this run: {svg} and {png}")
    if DOCS_PICTURE.parent.is_dir():
        shutil.copyfile(svg, DOCS_PICTURE)
        print(f"Copied to {os.path.relpath(DOCS_PICTURE)} (the README and the docs show it)")


def draw_timeline(timeline: Timeline, stem: Path) -> tuple[Path, Path]:
    """Write ``stem``.svg and ``stem``.png; ImportError if matplotlib is missing."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    heartbeat = dict(TASKS)
    # One lane per run (top of the lane at y), each group of runs under its heading.
    lanes: list[tuple[float, str, Run, str]] = []
    headings: list[tuple[float, str]] = []
    y = 0.0
    for task, runs in timeline.runs.items():
        if not runs:
            continue
        on = heartbeat.get(task, "on")
        headings.append((y - 0.3, f"{task}  (heartbeat {on})"))
        y -= HEADING
        for i, r in enumerate(runs):
            label = f"run {i + 1} on {r.worker}" + ("\n(duplicate)" if i else "")
            lanes.append((y, label, r, on))
            y -= LANE
    if not lanes:
        raise ValueError("no task run to draw")
    x_max = max(
        [r.end or r.start for _, _, r, _ in lanes]
        + [b for _, _, r, _ in lanes for _, b, _ in r.hidden]
        + [r.deleted or 0.0 for _, _, r, _ in lanes]
        + [timeline.task_seconds]
    )
    x_max = 1.0 * int(x_max + 1.5)
    lane_of = {id(r): top for top, _, r, _ in lanes}
    successor = {
        id(before): after
        for runs in timeline.runs.values()
        for before, after in itertools.pairwise(runs)
    }

    plt.rcParams.update({"svg.hashsalt": "celery-sqs-heartbeat", "font.size": 10})
    height = 2.0 + 0.55 * (-y)  # inches: the lanes, plus title, axis, legend and footer
    fig, ax = plt.subplots(figsize=(11, height))
    for top, _, r, on in lanes:
        end = r.end if r.end is not None else x_max
        ax.broken_barh(
            [(r.start, end - r.start)],
            (top + BAR[0], BAR[1]),
            color=RUN_ON if on == "on" else RUN_OFF,
        )
        for a, b, kind in r.hidden:
            ax.broken_barh(
                [(a, b - a)],
                (top + BAND[0], BAND[1]),
                color=HIDDEN_QUEUE if kind == "queue" else HIDDEN_BEAT,
                edgecolor="white",
                linewidth=0.6,
            )
        if r.beats:
            ax.plot(
                r.beats,
                [top + BAND[0] + BAND[1] + 0.08] * len(r.beats),
                "v",
                color=HIDDEN_BEAT,
                markersize=5,
            )
        if r.deleted is not None:
            ax.plot([r.deleted], [top + BAR[0] + BAR[1] / 2], "kx", markersize=7, mew=1.5)
        lapse = r.visible_again
        note_y = top + BAR[0] - 0.22
        if lapse is None:
            if r.beats:
                ax.text(
                    r.start,
                    note_y,
                    f"{len(r.beats)} beats kept its message hidden until the task ended: "
                    "it ran once",
                    color=RUN_ON,
                    fontsize=9,
                    va="center",
                )
            continue
        ax.broken_barh(
            [(lapse, end - lapse)],
            (top + BAR[0], BAR[1]),
            facecolor="none",
            edgecolor=EXPOSED,
            hatch="////",
            linewidth=0,
        )
        after = successor.get(id(r))
        if after is None:
            ax.plot([lapse, lapse], [top + BAND[0] + BAND[1], top + BAR[0]], color=EXPOSED)
            text = f"{lapse:.1f} s: visible again while the task still runs"
        else:
            # From the lapse on this lane to the next receipt of the same message.
            after_top = lane_of[id(after)]
            ax.plot([lapse, lapse], [top + BAND[0] + BAND[1], top + BAR[0]], color=EXPOSED, lw=1.2)
            ax.annotate(
                "",
                xy=(after.received, after_top + BAND[0] + BAND[1]),
                xytext=(lapse, top + BAR[0]),
                arrowprops={"arrowstyle": "-|>", "color": EXPOSED, "linewidth": 1.4},
            )
            text = (
                f"{lapse:.1f} s: visible again; {after.worker} receives it at "
                f"{after.received:.1f} s and runs it again"
            )
        # Right of the arrow, which crosses this line between the lapse and the receipt.
        text_x = (lapse if after is None else max(lapse, after.received)) + 0.15
        ax.text(text_x, note_y, text, color=EXPOSED, fontsize=9, va="center", ha="left")
    for y_text, text in headings:
        ax.text(0.0, y_text, text, fontsize=11, fontweight="bold", va="center", ha="left")

    ax.set_yticks(
        [top + (BAND[0] + BAR[0] + BAND[1]) / 2 for top, _, _, _ in lanes],
        [label for _, label, _, _ in lanes],
    )
    ax.set_ylim(y + 0.25, -0.1)
    ax.set_xlim(0, x_max)
    ax.set_xlabel("seconds since the demo began sending the two tasks")
    ax.grid(axis="x", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.tick_params(axis="y", length=0)

    counts = {task: len(runs) for task, runs in timeline.runs.items()}
    off_task, on_task = (name for name, _ in TASKS)
    fig.suptitle(
        f"Without the heartbeat, one {timeline.task_seconds:g} s task ran "
        f"{_times(counts.get(off_task, 0))}; with it, {_times(counts.get(on_task, 0))}",
        fontsize=14,
        fontweight="bold",
        x=0.01,
        y=1 - 0.08 / height,
        ha="left",
        va="top",
    )
    fig.text(
        0.01,
        1 - 0.45 / height,
        f"Queue visibility timeout {timeline.queue_timeout:g} s. Heartbeat every "
        f"{timeline.interval:g} s; each beat hides the message {timeline.window:g} s from "
        "then. Two workers, two processes each.",
        fontsize=10,
        color="#333333",
        va="top",
    )
    legend = [
        Patch(color=RUN_OFF, label="task running, heartbeat off"),
        Patch(color=RUN_ON, label="task running, heartbeat on"),
        Patch(
            facecolor="white",
            edgecolor=EXPOSED,
            hatch="////",
            label="still running, message visible",
        ),
        Patch(
            color=HIDDEN_QUEUE,
            label=f"message hidden: queue timeout ({timeline.queue_timeout:g} s)",
        ),
        Patch(color=HIDDEN_BEAT, label="message hidden: extended by a beat"),
        Line2D([], [], color=HIDDEN_BEAT, marker="v", linestyle="", label="beat"),
        Line2D(
            [], [], color="black", marker="x", mew=1.5, linestyle="", label="DeleteMessage (ack)"
        ),
    ]
    fig.legend(
        handles=legend,
        loc="lower center",
        bbox_to_anchor=(0.5, 0.22 / height),
        ncol=4,
        frameon=False,
        fontsize=9,
    )
    fig.text(
        0.01,
        0.06 / height,
        "Drawn by make demo from the requests moto's SQS answered and the tasks' own "
        f"start/end events; {datetime.datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} cores "
        f"({platform.machine()}), Python {platform.python_version()}.",
        fontsize=8,
        color="#555555",
    )
    fig.tight_layout(rect=(0, 0.75 / height, 1, 1 - 0.62 / height))
    svg, png = stem.with_suffix(".svg"), stem.with_suffix(".png")
    fig.savefig(svg, metadata={"Date": None})
    fig.savefig(png, dpi=150)
    plt.close(fig)
    return svg, png


def _times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


if __name__ == "__main__":
    sys.exit(main())
