"""The demo's Celery app: two identical "transcodes", one of them opted out.

Like a user's own tasks module, it never imports celery_sqs_heartbeat: the setting
``sqs_heartbeat_enabled`` turns the heartbeat on, and a task option turns it off for
one task.
"""

from __future__ import annotations

import json
import os
import time

from celery import Celery

app = Celery("demo_tasks", broker=os.environ["DEMO_BROKER_URL"])
app.conf.update(json.loads(os.environ["DEMO_CONFIG"]))


def _record(task: object, event: str) -> None:
    """Append one start or end event to the demo's log of runs (one line, one write)."""
    request = task.request  # type: ignore[attr-defined]
    line = json.dumps(
        {
            "event": event,
            "task": task.name,  # type: ignore[attr-defined]
            "worker": os.environ.get("DEMO_WORKER", "?"),
            "receipt_handle": request.properties["delivery_tag"],
            "at": time.time(),
        }
    )
    fd = os.open(os.environ["DEMO_RUNS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _transcode(task: object, seconds: float) -> None:
    _record(task, "start")
    time.sleep(seconds)  # the long part of a real transcode
    _record(task, "end")


@app.task(bind=True)
def transcode(self, seconds: float) -> None:
    """Protected: the heartbeat keeps its message hidden while it runs."""
    _transcode(self, seconds)


@app.task(bind=True, sqs_heartbeat_enabled=False)
def transcode_unprotected(self, seconds: float) -> None:
    """The same work with the heartbeat turned off for this task only."""
    _transcode(self, seconds)
