"""`make demo`: a long task runs twice without the heartbeat, and once with it.

Starts moto's SQS server on loopback and two real ``celery worker`` processes, sends
the same long "transcode" twice (one with the heartbeat turned off for that task),
and reports as it happens which worker runs what and each beat SQS receives.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from celery import Celery

from celery_sqs_heartbeat.testing import FAKE_AWS_ENV, SQSServer, WorkerProcess

HERE = Path(__file__).resolve().parent
QUEUE = "transcodes"
QUEUE_TIMEOUT = 4  # the queue's visibility timeout, in seconds
TASK_SECONDS = 10  # each transcode: 2.5 times the queue's timeout
INTERVAL = 1  # sqs_heartbeat_interval
WINDOW = 4  # sqs_heartbeat_visibility_timeout
WORKERS = 2

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
        try:
            for w in workers:
                w.wait_ready(60)
            return run(sqs, workers, runs_path)
        finally:
            for w in workers:
                w.stop()
            print(f"Worker logs: {tmp}")


def run(sqs: SQSServer, workers: list[WorkerProcess], runs_path: Path) -> int:
    sender = Celery("demo", broker=sqs.broker_url)
    sender.conf.update(CONFIG)
    start = time.time()
    for name in ("transcode_unprotected", "transcode"):
        sender.send_task(f"demo_tasks.{name}", args=[TASK_SECONDS])
        say(start, f"sent {name}")

    seen_runs, seen_beats = 0, 0
    runs: list[dict[str, object]] = []
    handles: dict[str, str] = {}
    deadline = start + TASK_SECONDS * 3 + 20
    queue_url = sqs.client().get_queue_url(QueueName=QUEUE)["QueueUrl"]
    while time.time() < deadline:
        if runs_path.exists():
            runs = [json.loads(line) for line in runs_path.read_text().splitlines()]
        for r in runs[seen_runs:]:
            handles[str(r["receipt_handle"])] = str(r["task"]).split(".")[-1]
            n = sum(x["task"] == r["task"] for x in runs[: runs.index(r) + 1])
            say(
                start,
                f"{r['worker']} started {str(r['task']).split('.')[-1]} (run #{n})"
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

    counts = {
        name: sum(str(r["task"]).endswith("." + name) for r in runs)
        for name in ("transcode_unprotected", "transcode")
    }
    beats_by_task: dict[str, int] = {}
    for b in sqs.visibility_changes():
        for rh in b.receipt_handles:
            beats_by_task[handles.get(rh, "?")] = beats_by_task.get(handles.get(rh, "?"), 0) + 1
    print()
    print(f"{'task':<24}{'heartbeat':<11}{'runs':<6}beats")
    for name, on in (("transcode_unprotected", "off"), ("transcode", "on")):
        print(f"{name:<24}{on:<11}{counts[name]:<6}{beats_by_task.get(name, 0)}")
    ok = counts["transcode"] == 1 and counts["transcode_unprotected"] >= 2
    print()
    print(
        "As expected: without the heartbeat the task ran again on a second worker; "
        "with it, exactly once."
        if ok
        else "UNEXPECTED RESULT: see the worker logs."
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
