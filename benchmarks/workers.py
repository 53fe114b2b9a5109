"""Figures 2-4 and 6: real ``celery worker`` processes against moto's server on loopback.

2. Throughput of no-op tasks, heartbeat on vs off, arms alternated (ABBA).
3. SQS requests the heartbeat makes for 50 concurrent long tasks in one threads worker.
4. Punctuality of beats while tasks spin on the CPU in pure Python.
6. Memory of an idle prefork worker, heartbeat on vs off, per process; and what the
   heartbeat adds to a threads worker that has run 10,000 tasks, all its processes.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from celery import Celery

from celery_sqs_heartbeat.testing import FAKE_AWS_ENV, SQSServer, WorkerProcess, wait_for

from ._stats import MotoProcess, median, percentile

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TRANSPORT = {"wait_time_seconds": 1, "polling_interval": 0.1}
THROUGHPUT_POLLING_INTERVAL = 0.005
THROUGHPUT_PREFETCH_MULTIPLIER = 8
#: Threads that fill the throughput queues (the loopback server answers them in parallel).
SEND_THREADS = 4
#: Rounds per arm in the throughput figure; each arm's rate is the median of them.
THROUGHPUT_ROUNDS = 3
#: Tasks sent to one arm at a time in the throughput figure: about the 2,000 tasks per arm
#: that ten rounds of 200 sent before (a multiple of SEND_THREADS).
ROUND_TASKS = 668


class Bench:
    def __init__(self, sqs: SQSServer) -> None:
        self.sqs = sqs
        self.tmp = Path(tempfile.mkdtemp(prefix="sqs-heartbeat-bench-"))

    def worker(
        self,
        conf: dict[str, Any],
        pool: str,
        concurrency: int,
        events: Path | None = None,
        broker_url: str | None = None,
    ) -> WorkerProcess:
        env = {
            **FAKE_AWS_ENV,
            "BENCH_BROKER_URL": broker_url or self.sqs.broker_url,
            "BENCH_CONFIG": json.dumps(conf),
            "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path]),
        }
        if events is not None:
            env["BENCH_EVENTS"] = str(events)
        name = f"b{uuid.uuid4().hex[:6]}"
        return WorkerProcess(
            "benchmarks.bench_tasks",
            pool=pool,
            concurrency=concurrency,
            name=name,
            env=env,
            cwd=ROOT,
            log_path=self.tmp / f"{name}.log",
            loglevel="INFO",
        )

    def sender(self, conf: dict[str, Any]) -> Celery:
        app = Celery("bench-sender", broker=self.sqs.broker_url)
        app.conf.update(conf)
        return app

    def queue_requests(self, queue: str, *actions: str) -> list[Any]:
        tail = f"/{queue}"
        return [
            r
            for r in self.sqs.requests(*actions)
            if str(r.params.get("QueueUrl", "")).endswith(tail)
        ]


def _conf(queue: str, heartbeat: bool, **extra: Any) -> dict[str, Any]:
    return {
        "task_default_queue": queue,
        "task_acks_late": True,
        "sqs_heartbeat_enabled": heartbeat,
        "broker_transport_options": {**TRANSPORT, "visibility_timeout": 60},
        **extra,
    }


# -- figure 2 -----------------------------------------------------------------------


def _throughput_pair(
    bench: Bench, broker_url: str, pool: str, concurrency: int, rounds: int
) -> dict[bool, float]:
    """Tasks per second of two workers, heartbeat on and off, each on a queue of its own.

    The tasks go in ``rounds`` rounds of ROUND_TASKS, to one arm then the other (the order
    swapped every round): moto's cost per request grows with the messages it holds, so a
    queue of one round at a time keeps it from being all that is measured. A round's rate
    is taken from the worker's own log, first task done to last; each arm's rate is its
    median round.
    """
    arms: dict[bool, tuple[str, dict[str, Any]]] = {}
    for heartbeat in (True, False):
        queue = f"tp-{uuid.uuid4().hex[:8]}"
        conf = _conf(queue, heartbeat)
        # Poll again at once when the prefetch buffer frees up, ten messages at a time:
        # the broker's round trips, the same for both arms, then bound the rate.
        conf["broker_transport_options"]["polling_interval"] = THROUGHPUT_POLLING_INTERVAL
        conf["worker_prefetch_multiplier"] = THROUGHPUT_PREFETCH_MULTIPLIER
        arms[heartbeat] = (queue, conf)
    workers = {
        heartbeat: bench.worker(conf, pool, concurrency, broker_url=broker_url).start()
        for heartbeat, (_, conf) in arms.items()
    }
    rates: dict[bool, list[float]] = {True: [], False: []}
    try:
        for worker in workers.values():
            worker.wait_ready(60)
        for r in range(rounds):
            for heartbeat in (True, False) if r % 2 == 0 else (False, True):
                queue, conf = arms[heartbeat]
                worker = workers[heartbeat]
                before = len(worker.log_lines(" succeeded in "))
                send = functools.partial(
                    _send_noops, broker_url, queue, conf, ROUND_TASKS // SEND_THREADS
                )
                with ThreadPoolExecutor(SEND_THREADS) as senders:
                    for future in [senders.submit(send) for _ in range(SEND_THREADS)]:
                        future.result()
                lines = wait_for(
                    lambda w=worker, n=before + ROUND_TASKS: (
                        found if len(found := w.log_lines(" succeeded in ")) >= n else None
                    ),
                    timeout=300,
                    interval=0.05,
                    what="a round of tasks to succeed",
                )[before:]
                stamps = sorted(_log_time(line) for line in lines)
                rates[heartbeat].append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    finally:
        for worker in workers.values():
            worker.stop()
    # The median round: one round slowed by something else on the machine moves it little.
    return {arm: median(found) for arm, found in rates.items()}


def _send_noops(broker_url: str, queue: str, conf: dict[str, Any], n: int) -> None:
    sender = Celery("bench-sender", broker=broker_url)
    sender.conf.update(conf)
    with sender.producer_or_acquire() as producer:
        for _ in range(n):
            sender.send_task("benchmarks.bench_tasks.noop", queue=queue, producer=producer)


def _log_time(line: str) -> float:
    """Seconds of a worker log line's "[2026-11-21 18:19:07,509: ..." timestamp."""
    stamp = line[1:24]
    seconds = time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S"))
    return seconds + int(stamp[20:23]) / 1000


def throughput(bench: Bench, rounds: int = THROUGHPUT_ROUNDS) -> dict[str, Any]:
    """No-op tasks per second, heartbeat on vs off, against moto in a process of its own."""
    results: dict[str, Any] = {}
    with MotoProcess() as moto:
        broker_url = f"sqs://127.0.0.1:{moto.port}"
        for pool, concurrency in (("prefork", 2), ("threads", 8)):
            rates = _throughput_pair(bench, broker_url, pool, concurrency, rounds)
            results[f"{pool} -c {concurrency}"] = {
                "on": rates[True],
                "off": rates[False],
                "ratio": rates[True] / rates[False],
            }
    return results


# -- figure 3 -----------------------------------------------------------------------


def sqs_calls(
    bench: Bench, tasks: int = 50, intervals: int = 10, interval: float = 1.0
) -> dict[str, Any]:
    queue = f"calls-{uuid.uuid4().hex[:8]}"
    conf = _conf(
        queue,
        True,
        worker_prefetch_multiplier=1,
        sqs_heartbeat_interval=interval,
        sqs_heartbeat_visibility_timeout=5,
    )
    events = bench.tmp / f"{queue}.jsonl"
    worker = bench.worker(conf, "threads", tasks, events).start().wait_ready(60)
    try:
        sender = bench.sender(conf)
        with sender.producer_or_acquire() as producer:
            for _ in range(tasks):
                sender.send_task(
                    "benchmarks.bench_tasks.sleep",
                    args=[(intervals + 1.5) * interval],
                    queue=queue,
                    producer=producer,
                )
        wait_for(lambda: _count(events, "start") >= tasks, timeout=60, what="all tasks to start")
        started = time.time()
        time.sleep(interval * (intervals + 1))
        wait_for(
            lambda: len(bench.queue_requests(queue, "DeleteMessage")) >= tasks,
            timeout=60,
            what="all tasks to end",
        )
    finally:
        worker.stop()
    beats = bench.queue_requests(queue, "ChangeMessageVisibility", "ChangeMessageVisibilityBatch")
    window = [r for r in beats if started <= r.at < started + intervals * interval]
    per_interval = [
        sum(1 for r in window if started + i * interval <= r.at < started + (i + 1) * interval)
        for i in range(intervals)
    ]
    entries = sum(len(r.receipt_handles) for r in window)
    naive = tasks * intervals
    return {
        "tasks": tasks,
        "intervals": intervals,
        "requests": len(window),
        "entries": entries,
        "naive_requests": naive,
        "per_interval": per_interval,
        "max_per_interval": max(per_interval),
        "target_per_interval": math.ceil(tasks / 10),
        "fewer": naive / len(window) if window else math.inf,
    }


# -- figure 4 -----------------------------------------------------------------------


def _wait_acked(bench: Bench, queue: str, tasks: int, timeout: float) -> None:
    wait_for(
        lambda: len(bench.queue_requests(queue, "DeleteMessage")) >= tasks,
        timeout=timeout,
        what=f"{tasks} tasks to be acknowledged",
    )


def _count(path: Path, event: str) -> int:
    if not path.exists():
        return 0
    return sum(json.loads(line)["event"] == event for line in path.read_text().splitlines())


#: Interval and window of the punctuality figure: lateness must stay well within the
#: margin between them.
PUNCTUALITY_INTERVAL = 1.0
PUNCTUALITY_WINDOW = 4


#: The punctuality figure's workers: pool, spinning tasks, and where the beats come from
#: in a threads worker (its heartbeat process, the default, or a thread of its own process).
PUNCTUALITY_ARMS = (
    ("threads", 1, "heartbeat process"),
    ("threads", 4, "heartbeat process"),
    ("threads", 8, "heartbeat process"),
    ("threads", 8, "in-process"),
    ("prefork", 8, ""),
)


def punctuality(bench: Bench, seconds: float = 10.0) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for pool, spinning, beats_from in PUNCTUALITY_ARMS:
        queue = f"punct-{uuid.uuid4().hex[:8]}"
        conf = _conf(
            queue,
            True,
            worker_prefetch_multiplier=1,
            sqs_heartbeat_interval=PUNCTUALITY_INTERVAL,
            sqs_heartbeat_visibility_timeout=PUNCTUALITY_WINDOW,
            sqs_heartbeat_own_process=beats_from != "in-process",
        )
        conf["broker_transport_options"]["visibility_timeout"] = 3
        events = bench.tmp / f"{queue}.jsonl"
        concurrency = spinning + 1 if pool == "threads" else spinning
        worker = bench.worker(conf, pool, concurrency, events).start().wait_ready(60)
        try:
            sender = bench.sender(conf)
            for _ in range(spinning):
                sender.send_task("benchmarks.bench_tasks.spin", args=[seconds], queue=queue)
            _wait_acked(bench, queue, spinning, timeout=seconds + 60)
        finally:
            worker.stop()
        records = [json.loads(line) for line in events.read_text().splitlines()]
        lateness = [r["lateness"] * 1000 for r in records if r["event"] == "beat"]
        first = [r["lateness"] * 1000 for r in records if r["event"] == "beat" and r["beat"] == 1]
        name = f"{pool}, {spinning} spinning" + (f", {beats_from}" if beats_from else "")
        results[name] = {
            "beats": len(lateness),
            "p50_ms": percentile(lateness, 50),
            "p99_ms": percentile(lateness, 99),
            "max_ms": max(lateness) if lateness else math.nan,
            "first_beat_max_ms": max(first) if first else math.nan,
            "runs": sum(r["event"] == "start" for r in records),
            "tasks": spinning,
            "lost": sum(r["event"] == "lost" for r in records),
            "lateness_ms": lateness,  # every beat, for the chart's distribution
        }
    return results


# -- figure 6 -----------------------------------------------------------------------

#: Pool processes of the memory figure's worker.
MEMORY_CONCURRENCY = 4
#: How long the worker idles after it is ready before its memory is read.
MEMORY_SETTLE_SECONDS = 3.0


def _pss_mb(pid: int) -> float:
    """Proportional set size: private pages, plus shared ones divided among sharers."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no Pss for process {pid}")


def _private_mb(pid: int) -> float:
    """Private pages only (clean and dirty): what the process adds to the machine."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total / 1024


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def memory(bench: Bench) -> list[dict[str, Any]]:
    """PSS of an idle prefork worker's main process and of its pool children (mean),
    heartbeat off and on, one worker after the other, against the same server."""
    rows: list[dict[str, Any]] = []
    for heartbeat in (False, True):
        conf = _conf(f"mem-{uuid.uuid4().hex[:8]}", heartbeat)
        worker = bench.worker(conf, "prefork", MEMORY_CONCURRENCY).start().wait_ready(60)
        try:
            time.sleep(MEMORY_SETTLE_SECONDS)
            assert worker.process is not None
            main = worker.process.pid
            children = _children(main)
            arm = "on" if heartbeat else "off"
            rows.append({"process": "main", "heartbeat": arm, "pss_mb": _pss_mb(main)})
            rows.append(
                {
                    "process": "child",
                    "heartbeat": arm,
                    "pss_mb": sum(_pss_mb(c) for c in children) / len(children),
                }
            )
        finally:
            worker.stop()
    return rows + heartbeat_process_memory(bench)


def heartbeat_process_memory(bench: Bench) -> list[dict[str, Any]]:
    """Private memory and PSS of an idle threads worker's heartbeat process, after it beat a
    message (its SQS client made and used), and of the keeper that forked it."""
    queue = f"mem-{uuid.uuid4().hex[:8]}"
    conf = _conf(queue, True, sqs_heartbeat_interval=1, sqs_heartbeat_visibility_timeout=4)
    worker = bench.worker(conf, "threads", MEMORY_CONCURRENCY).start().wait_ready(60)
    try:
        bench.sender(conf).send_task("benchmarks.bench_tasks.spin", args=[3], queue=queue)
        _wait_acked(bench, queue, 1, timeout=60)
        time.sleep(MEMORY_SETTLE_SECONDS)
        assert worker.process is not None
        (keeper,) = _children(worker.process.pid)
        (beats,) = _children(keeper)
        return [
            {
                "process": process,
                "heartbeat": "on",
                "pss_mb": _pss_mb(pid),
                "private_mb": _private_mb(pid),
            }
            for process, pid in (("heartbeat process", beats), ("keeper", keeper))
        ]
    finally:
        worker.stop()


#: Tasks an aged worker has run before its memory is read (the issue's "after the same
#: >= 10,000 tasks"), sent in rounds so that moto holds few messages at once.
AGED_TASKS = 10_000
AGED_ROUND = 1_000


def _tree(pid: int) -> list[int]:
    """*pid* and every process below it."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += _children(p)
    return found


def aged_memory(
    bench: Bench, tasks: int = AGED_TASKS, arms: tuple[bool, ...] = (False, True)
) -> dict[str, Any]:
    """What the heartbeat adds to a threads worker (-c 4) that has run *tasks* no-op
    tasks: the sum of the PSS of all its processes (the worker, the keeper, the heartbeat
    process), heartbeat on minus the same worker with it off. The sum of PSS over a
    tree of forks counts each physical page once, so the difference is what the
    heartbeat costs the machine, shared pages included."""
    result: dict[str, Any] = {"tasks": tasks}
    with MotoProcess() as moto:
        broker_url = f"sqs://127.0.0.1:{moto.port}"
        for heartbeat in arms:
            queue = f"aged-{uuid.uuid4().hex[:8]}"
            conf = _conf(queue, heartbeat)
            conf["broker_transport_options"]["polling_interval"] = THROUGHPUT_POLLING_INTERVAL
            conf["worker_prefetch_multiplier"] = THROUGHPUT_PREFETCH_MULTIPLIER
            worker = bench.worker(conf, "threads", MEMORY_CONCURRENCY, broker_url=broker_url)
            worker.start().wait_ready(60)
            try:
                assert worker.process is not None
                young = {p: _pss_mb(p) for p in _tree(worker.process.pid)}
                for done in range(AGED_ROUND, tasks + 1, AGED_ROUND):
                    send = functools.partial(
                        _send_noops, broker_url, queue, conf, AGED_ROUND // SEND_THREADS
                    )
                    with ThreadPoolExecutor(SEND_THREADS) as senders:
                        for future in [senders.submit(send) for _ in range(SEND_THREADS)]:
                            future.result()
                    wait_for(
                        lambda n=done, w=worker: len(w.log_lines(" succeeded in ")) >= n,
                        timeout=600,
                        interval=0.5,
                        what=f"{done} tasks to succeed",
                    )
                time.sleep(MEMORY_SETTLE_SECONDS)
                aged = {p: _pss_mb(p) for p in _tree(worker.process.pid)}
            finally:
                worker.stop()
            arm = "on" if heartbeat else "off"
            result[arm] = {
                "young_mb": sum(young.values()),
                "aged_mb": sum(aged.values()),
                "processes": len(aged),
            }
    if len(arms) == 2:
        result["added_young_mb"] = result["on"]["young_mb"] - result["off"]["young_mb"]
        result["added_mb"] = result["on"]["aged_mb"] - result["off"]["aged_mb"]
    return result


def run() -> dict[str, Any]:
    os.environ.update(FAKE_AWS_ENV)
    with SQSServer() as sqs:
        bench = Bench(sqs)
        return {
            "memory": memory(bench),
            "aged_memory": aged_memory(bench),
            "throughput": throughput(bench),
            "calls": sqs_calls(bench),
            "punctuality": punctuality(bench),
        }


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument(
        "figure", choices=["memory", "aged_memory", "throughput", "calls", "punctuality"]
    )
    args = parser.parse_args()
    os.environ.update(FAKE_AWS_ENV)
    with SQSServer() as server:
        print(
            json.dumps(
                globals()[args.figure if args.figure != "calls" else "sqs_calls"](Bench(server)),
                indent=2,
            )
        )
