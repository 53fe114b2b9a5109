"""`make soak`: one mixed run against moto's server, as long as it takes (~5 min).

Two workers, one prefork and one threads, share one queue whose own visibility timeout
is QUEUE_TIMEOUT; 10,000 short tasks and 50 long ones (3x the queue's timeout) are sent
to it, the long ones spread among the short, never more than BACKLOG ahead of the
workers. Checked at the end:

* every task's effect was recorded exactly once (counted by task id), and no task
  started twice;
* nothing is left in the queue, visible or in flight, one queue timeout after the last
  task ended;
* no heartbeat lost its message;
* no worker process gained more threads after warming up than the heartbeat's sender
  threads, which are made on demand up to MAX_CALLS (so the count is bounded, not
  growing with tasks), and none gained more than RSS_GROWTH_LIMIT_MB of memory.

Prints the numbers (and the machine) and exits with status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import boto3

from celery_sqs_heartbeat._sidecar import MAX_CALLS
from celery_sqs_heartbeat.testing import FAKE_AWS_ENV, SQSServer, WorkerProcess, wait_for

from ._stats import MotoProcess
from .workers import TRANSPORT, Bench

#: Where a full run writes what it printed, for docs/reliability.md.
REPORT = Path(__file__).resolve().parent.parent / "docs" / "soak.txt"
#: The queue's own visibility timeout, in seconds.
QUEUE_TIMEOUT = 10
#: Long tasks last this many queue timeouts.
LONG_FACTOR = 3
INTERVAL = 2.0
VISIBILITY = 10
#: Tasks sent and not yet done, at most. moto scans every message it holds on each
#: receive, so a backlog of 10,000 makes each call slower than the queue's timeout and
#: the soak would measure moto, not the workers.
BACKLOG = 300
SHORT_TASKS = 10_000
LONG_TASKS = 50
#: Threads sending the tasks.
SEND_THREADS = 4
#: How often the worker processes' threads and memory are sampled, in seconds.
SAMPLE_EVERY = 5.0
#: Memory a worker process may gain between the warmed-up sample and the last one.
RSS_GROWTH_LIMIT_MB = 20.0
#: The share of short tasks done when a worker counts as warmed up.
WARM_FRACTION = 0.1


def _process_tree(pid: int) -> list[int]:
    """*pid* and its children (a prefork worker's pool), from /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                children.append(int(entry))
    return [pid, *sorted(children)]


def _sample(pid: int) -> tuple[int, float]:
    """(threads, RSS in MB) of one process."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["Threads"]), int(fields["VmRSS"].split()[0]) / 1024


def _sample_workers(
    workers: list[WorkerProcess],
    samples: dict[int, list[tuple[float, int, float]]],
    progress: float,
) -> None:
    """Add (progress, threads, RSS) of every process of *workers* to *samples*."""
    for w in workers:
        for pid in _process_tree(w.pid):
            with contextlib.suppress(OSError):  # a process that just ended
                samples.setdefault(pid, []).append((progress, *_sample(pid)))


def _events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _queue_counts(endpoint: str, queue: str) -> tuple[int, int]:
    client = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1")
    url = client.get_queue_url(QueueName=queue)["QueueUrl"]
    attrs = client.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]), int(
        attrs["ApproximateNumberOfMessagesNotVisible"]
    )


def _send(
    bench: Bench, conf: dict[str, Any], jobs: list[float], room: threading.Semaphore
) -> list[str]:
    sender = bench.sender(conf)
    ids = []
    with sender.producer_or_acquire() as producer:
        for seconds in jobs:
            room.acquire()
            ids.append(
                sender.send_task(
                    "benchmarks.bench_tasks.effect",
                    args=[seconds],
                    queue=conf["task_default_queue"],
                    producer=producer,
                ).id
            )
    return ids


def soak(short: int, long: int, heartbeat: bool = True) -> dict[str, Any]:
    os.environ.update(FAKE_AWS_ENV)
    results: dict[str, Any] = {"short_tasks": short, "long_tasks": long}
    with MotoProcess() as moto:
        broker_url = f"sqs://127.0.0.1:{moto.port}"
        # Bench builds the workers and senders; they need only the server's broker URL.
        bench = Bench(cast(SQSServer, _Endpoint(broker_url)))
        queue = f"soak-{uuid.uuid4().hex[:8]}"
        events = bench.tmp / f"{queue}.jsonl"
        conf = {
            "task_default_queue": queue,
            "task_acks_late": True,
            "sqs_heartbeat_enabled": heartbeat,
            "sqs_heartbeat_interval": INTERVAL,
            "sqs_heartbeat_visibility_timeout": VISIBILITY,
            "broker_transport_options": {**TRANSPORT, "visibility_timeout": QUEUE_TIMEOUT},
        }
        workers = [
            bench.worker(conf, "prefork", 4, events, broker_url=broker_url).start(),
            bench.worker(conf, "threads", 8, events, broker_url=broker_url).start(),
        ]
        for w in workers:
            w.wait_ready(60)
        long_seconds = LONG_FACTOR * QUEUE_TIMEOUT
        jobs = [0.0] * short
        for i in range(long):  # spread the long tasks among the short ones
            jobs.insert((i + 1) * len(jobs) // (long + 1), long_seconds)
        chunks = [jobs[i::SEND_THREADS] for i in range(SEND_THREADS)]
        samples: dict[int, list[tuple[float, int, float]]] = {}
        started = time.time()
        try:
            with ThreadPoolExecutor(SEND_THREADS) as pool:
                room = threading.Semaphore(BACKLOG)
                futures = [pool.submit(_send, bench, conf, chunk, room) for chunk in chunks]
                ids: list[str] = []
                done = 0
                next_sample = 0.0
                while done < len(jobs):
                    now = time.time()
                    if now >= next_sample:
                        next_sample = now + SAMPLE_EVERY
                        _sample_workers(workers, samples, done / len(jobs))
                    now_done = sum(e["event"] == "done" for e in _events(events))
                    for _ in range(now_done - done):
                        room.release()
                    done = now_done
                    if now - started > 3600:
                        raise TimeoutError(f"only {done} of {len(jobs)} tasks done in an hour")
                    time.sleep(0.5)
                for f in futures:
                    ids.extend(f.result())
            ended = time.time()
            # One more queue timeout (and a poll): a message whose heartbeat failed would
            # be delivered again by now.
            time.sleep(QUEUE_TIMEOUT + 2)
            wait_for(
                lambda: _queue_counts(moto.endpoint_url, queue) == (0, 0),
                timeout=60,
                what="the queue to be empty",
            )
            left = _queue_counts(moto.endpoint_url, queue)
            _sample_workers(workers, samples, 1.0)
        finally:
            for w in workers:
                w.stop()
        found = _events(events)
        dones = Counter(e["task_id"] for e in found if e["event"] == "done")
        starts = Counter(e["task_id"] for e in found if e["event"] == "start")
        results.update(
            seconds=ended - started,
            tasks_per_second=len(jobs) / (ended - started),
            sent=len(ids),
            effects=sum(dones.values()),
            missing=len(set(ids) - set(dones)),
            effects_twice=sum(n > 1 for n in dones.values()),
            started_twice=sum(n > 1 for n in starts.values()),
            beats=sum(e["event"] == "beat" for e in found),
            lost=sum(e["event"] == "lost" for e in found),
            left_in_queue=left,
        )
        processes = []
        for pid, rows in sorted(samples.items()):
            warm = [r for r in rows if r[0] >= WARM_FRACTION] or rows
            processes.append(
                {
                    "pid": pid,
                    "threads_warm": warm[0][1],
                    "threads_end": rows[-1][1],
                    "threads_max": max(r[1] for r in warm),
                    "rss_warm_mb": round(warm[0][2], 1),
                    "rss_end_mb": round(rows[-1][2], 1),
                    "samples": len(rows),
                }
            )
        results["processes"] = processes
    return results


class _Endpoint:
    """What Bench needs of a server: the broker URL (moto runs in its own process)."""

    def __init__(self, broker_url: str) -> None:
        self.broker_url = broker_url


def _checks(r: dict[str, Any]) -> list[tuple[str, bool]]:
    total = r["short_tasks"] + r["long_tasks"]
    return [
        (
            f"every effect recorded exactly once ({r['effects']} of {total})",
            r["effects"] == total and r["missing"] == 0 and r["effects_twice"] == 0,
        ),
        (f"no task started twice ({r['started_twice']})", r["started_twice"] == 0),
        (
            f"nothing left in the queue (visible, in flight: {r['left_in_queue']})",
            tuple(r["left_in_queue"]) == (0, 0),
        ),
        (f"no message lost by a heartbeat ({r['lost']})", r["lost"] == 0),
        *(
            (
                f"process {p['pid']}: threads {p['threads_warm']} -> {p['threads_end']} "
                f"(max {p['threads_max']}), RSS {p['rss_warm_mb']} -> {p['rss_end_mb']} MB",
                p["threads_max"] - p["threads_warm"] <= MAX_CALLS
                and p["rss_end_mb"] - p["rss_warm_mb"] <= RSS_GROWTH_LIMIT_MB,
            )
            for p in r["processes"]
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=int, default=SHORT_TASKS)
    parser.add_argument("--long", type=int, default=LONG_TASKS)
    parser.add_argument(
        "--heartbeat-off", action="store_true", help="the twin: long tasks run twice"
    )
    args = parser.parse_args()
    r = soak(args.short, args.long, heartbeat=not args.heartbeat_off)
    lines = [
        f"celery-sqs-heartbeat soak: {platform.platform()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        f"{r['short_tasks']} short + {r['long_tasks']} long tasks "
        f"({LONG_FACTOR * QUEUE_TIMEOUT} s, queue timeout {QUEUE_TIMEOUT} s, interval "
        f"{INTERVAL:g} s, window {VISIBILITY} s); workers prefork -c 4 and threads -c 8",
        f"{r['seconds']:.0f} s, {r['tasks_per_second']:.1f} tasks/s, {r['beats']} beats",
    ]
    checks = _checks(r)
    lines += [f"  [{'ok' if ok else 'FAILED'}] {text}" for text, ok in checks]
    print("\n".join(lines))
    if (args.short, args.long, args.heartbeat_off) == (SHORT_TASKS, LONG_TASKS, False):
        REPORT.write_text("\n".join(lines) + "\n")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
