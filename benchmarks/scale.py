"""Figure 5: 5,000 concurrent heartbeats in one process, against moto in a process of
its own: memory per heartbeat, CPU the heartbeat thread uses per interval, lateness.

The heartbeats stand for 5,000 real in-flight messages (50 queues of 100), registered
evenly over the first interval as tasks would start, then beaten for two more.
"""

from __future__ import annotations

import os
import threading
import time
import tracemalloc
from typing import Any

import boto3

from celery_sqs_heartbeat import signals
from celery_sqs_heartbeat._client import BrokerInfo, Clients
from celery_sqs_heartbeat._heartbeat import Heartbeat
from celery_sqs_heartbeat._report import Counters, Reporter
from celery_sqs_heartbeat._send import Sender
from celery_sqs_heartbeat._settings import HeartbeatOptions
from celery_sqs_heartbeat._sidecar import Sidecar
from celery_sqs_heartbeat.testing import FAKE_AWS_ENV

from ._stats import MotoProcess, percentile

QUEUES = 50
PER_QUEUE = 100
INTERVAL = 10.0
OPTIONS = HeartbeatOptions(
    enabled=True, interval=INTERVAL, visibility_timeout=60, max_duration=None
)


def _messages(client: Any) -> list[tuple[str, str]]:
    """(queue URL, receipt handle) of QUEUES x PER_QUEUE received, in-flight messages."""
    found = []
    for q in range(QUEUES):
        url = client.create_queue(QueueName=f"scale-{q}")["QueueUrl"]
        for start in range(0, PER_QUEUE, 10):
            client.send_message_batch(
                QueueUrl=url,
                Entries=[{"Id": str(i), "MessageBody": "x"} for i in range(start, start + 10)],
            )
        got = 0
        while got < PER_QUEUE:
            for m in client.receive_message(
                QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=120
            ).get("Messages", []):
                found.append((url, m["ReceiptHandle"]))
                got += 1
    return found


def _sidecar(clients: Any) -> Sidecar:
    reporter = Reporter(Counters(), region=lambda: None)
    return Sidecar(Sender(clients), reporter, call_timeout=5.0)


def _add(sidecar: Sidecar, url: str, handle: str, task_id: str) -> None:
    sidecar.add(Heartbeat(handle, url, OPTIONS, time.monotonic(), "bench.task", task_id))


def _memory_per_heartbeat(messages: list[tuple[str, str]]) -> float:
    sidecar = _sidecar(lambda url: None)  # not started: no beats
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for url, handle in messages:
        _add(sidecar, url, handle, "task-id")
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    return grown / len(messages)


def _thread_cpu_seconds(thread: threading.Thread) -> float:
    with open(f"/proc/self/task/{thread.native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run() -> dict[str, Any]:
    os.environ.update(FAKE_AWS_ENV)
    with MotoProcess() as moto:
        client = boto3.client("sqs", endpoint_url=moto.endpoint_url, region_name="us-east-1")
        messages = _messages(client)
        memory = _memory_per_heartbeat(messages)

        broker = BrokerInfo(
            hostname="127.0.0.1", port=moto.port, userid=None, password=None, transport_options={}
        )
        clients = Clients(broker, timeout=5.0)
        clients.warm_up()
        sidecar = _sidecar(clients.for_queue)
        beats: list[tuple[float, float]] = []
        failures: list[str] = []

        def on_beat(lateness: float = 0.0, **_: object) -> None:
            beats.append((time.monotonic(), lateness))

        def on_failure(failure: str = "", **_: object) -> None:
            failures.append(failure)

        signals.beat_sent.connect(on_beat, weak=False)
        signals.beat_failed.connect(on_failure, weak=False)
        sidecar.run_in_background()
        thread = sidecar._thread
        assert thread is not None
        try:
            start = time.monotonic()
            for i, (url, handle) in enumerate(messages):  # evenly over one interval
                delay = start + i * INTERVAL / len(messages) - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                _add(sidecar, url, handle, str(i))
            cpu_from, steady_from = _thread_cpu_seconds(thread), time.monotonic()
            # Beats begin one interval after the first registration: the next two
            # intervals see every heartbeat beat twice.
            time.sleep(2 * INTERVAL)
            cpu = _thread_cpu_seconds(thread) - cpu_from
            elapsed = time.monotonic() - steady_from
        finally:
            signals.beat_sent.disconnect(on_beat)
            signals.beat_failed.disconnect(on_failure)
            sidecar.shutdown(5)
        lateness = [late * 1000 for _, late in beats]
        return {
            "heartbeats": len(messages),
            "interval_s": INTERVAL,
            "memory_per_heartbeat_bytes": memory,
            "cpu_per_interval_s": cpu / elapsed * INTERVAL,
            "beats": len(lateness),
            "lateness_p50_ms": percentile(lateness, 50),
            "lateness_p99_ms": percentile(lateness, 99),
            "lateness_max_ms": max(lateness),
            "failures": len(failures),
        }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
