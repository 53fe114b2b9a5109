"""The Celery app the worker benchmarks run. Unlike the tests' app it imports the package:
it records every beat's lateness from the heartbeat's own ``beat_sent`` signal."""

from __future__ import annotations

import json
import os
import time

from celery import Celery

from celery_sqs_heartbeat import signals

app = Celery("bench_tasks", broker=os.environ["BENCH_BROKER_URL"])
app.conf.update(json.loads(os.environ.get("BENCH_CONFIG", "{}")))


def _append(path: str, record: dict[str, object]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


if os.environ.get("BENCH_EVENTS"):

    @signals.beat_sent.connect(weak=False)
    def _on_beat(lateness: float = 0.0, task_id: str = "", beats: int = 0, **_: object) -> None:
        _append(
            os.environ["BENCH_EVENTS"],
            {"event": "beat", "task_id": task_id, "beat": beats, "lateness": lateness},
        )

    @signals.message_lost.connect(weak=False)
    def _on_lost(task_id: str = "", reason: str = "", **_: object) -> None:
        _append(os.environ["BENCH_EVENTS"], {"event": "lost", "task_id": task_id, "reason": reason})


@app.task
def noop() -> None:
    """Nothing: measures the worker's own per-task cost."""


@app.task(bind=True)
def sleep(self, seconds: float) -> None:  # type: ignore[no-untyped-def]
    if os.environ.get("BENCH_EVENTS"):
        _append(os.environ["BENCH_EVENTS"], {"event": "start", "task_id": self.request.id})
    time.sleep(seconds)


@app.task(bind=True)
def spin(self, seconds: float) -> None:  # type: ignore[no-untyped-def]
    """Pure-Python CPU work: the GIL is only released at the interpreter's switch interval."""
    if os.environ.get("BENCH_EVENTS"):
        _append(os.environ["BENCH_EVENTS"], {"event": "start", "task_id": self.request.id})
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1


@app.task(bind=True)
def effect(self, seconds: float) -> None:  # type: ignore[no-untyped-def]
    """The soak's task: records its start and, once done, its one effect, by task id."""
    path = os.environ["BENCH_EVENTS"]
    _append(path, {"event": "start", "task_id": self.request.id, "pid": os.getpid()})
    if seconds:
        time.sleep(seconds)
    _append(path, {"event": "done", "task_id": self.request.id})
