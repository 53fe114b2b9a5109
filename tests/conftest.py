"""Fixtures: one SQS endpoint per test session, and a scenario per test.

The endpoint is moto's server on loopback unless ``SQS_TEST_ENDPOINT`` names another
(LocalStack, ElasticMQ, real SQS: see ``tests/support/sqs_endpoint.py`` and docs/testing.md).
Every test under ``tests/integration`` is marked ``integration``.

A :class:`Scenario` owns a fresh queue, the Celery settings its workers get, the file
their tasks record their runs in, and the workers it started (stopped at teardown, and
its queues deleted).
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from celery import Celery

from celery_sqs_heartbeat.testing import (
    FAKE_AWS_ENV,
    RecordedRequest,
    SQSServer,
    WorkerProcess,
    wait_for,
)

from .support.sqs_endpoint import ENDPOINT_ENV, ExternalSQS, queue_prefix

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
#: The modules the tests' workers import (``worker_app``...): their ``PYTHONPATH`` and
#: working directory.
SUPPORT = TESTS / "support"
#: The metric recipes the docs show, loaded by workers through ``imports``.
EXAMPLES = ROOT / "examples"
#: The folder whose tests start real workers: each gets the ``integration`` marker.
INTEGRATION = TESTS / "integration"
#: kombu's long-poll wait in the tests' workers (``wait_time_seconds``); also the
#: visibility kombu sets when it requeues a message.
KOMBU_WAIT_SECONDS = 1
#: Time a worker may need to receive a message that became visible: its long poll and
#: polling interval, and a loaded machine's scheduling.
RECEIVE_SLACK = 2.5


#: What the tests run against: moto's server (with its request log) or another endpoint.
SQS = SQSServer | ExternalSQS


def external_endpoint() -> str:
    return os.environ.get(ENDPOINT_ENV, "")


@pytest.fixture(scope="session")
def sqs() -> Iterator[SQS]:
    endpoint = external_endpoint()
    if endpoint:
        with ExternalSQS(endpoint) as external:
            yield external
        return
    os.environ.update(FAKE_AWS_ENV)
    with SQSServer() as server:
        yield server


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "needs_request_log(reason): reads requests only moto's server records (deletes, "
        "kombu's own visibility changes, batch shapes); skipped on any other endpoint",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(INTEGRATION):
            item.add_marker(pytest.mark.integration)
    endpoint = external_endpoint()
    if not endpoint:
        return
    for item in items:
        marker = item.get_closest_marker("needs_request_log")
        if marker is not None:
            why = marker.args[0] if marker.args else "the server's request log"
            item.add_marker(
                pytest.mark.skip(reason=f"needs {why}; only moto's server records it ({endpoint})")
            )


@dataclass
class Run:
    """One recorded start or end of a task."""

    event: str
    task_id: str
    worker: str
    at: float
    retries: int
    receipt_handle: str | None


@dataclass
class Scenario:
    sqs: SQS
    tmp: Path
    queue: str = field(default_factory=lambda: f"{queue_prefix()}{uuid.uuid4().hex[:10]}")
    workers: list[WorkerProcess] = field(default_factory=list)
    _apps: dict[str, Celery] = field(default_factory=dict)

    @property
    def events_path(self) -> Path:
        return self.tmp / "events.jsonl"

    def config(
        self,
        *,
        queue_timeout: int,
        heartbeat: bool | None,
        interval: float = 0.5,
        visibility: int = 2,
        **extra: Any,
    ) -> dict[str, Any]:
        """Celery settings for this scenario's workers and its sending app."""
        conf: dict[str, Any] = {
            "task_default_queue": self.queue,
            "sqs_heartbeat_interval": interval,
            "sqs_heartbeat_visibility_timeout": visibility,
            "broker_transport_options": {
                "visibility_timeout": queue_timeout,
                "wait_time_seconds": KOMBU_WAIT_SECONDS,
                "polling_interval": 0.1,
                **self.region_option(),
            },
        }
        if heartbeat is not None:
            conf["sqs_heartbeat_enabled"] = heartbeat
        conf.update(extra)
        return conf

    def worker(
        self,
        conf: dict[str, Any],
        *,
        pool: str = "prefork",
        concurrency: int = 1,
        name: str | None = None,
        start: bool = True,
        broker_url: str | None = None,
        env: dict[str, str] | None = None,
        queues: tuple[str, ...] = (),
    ) -> WorkerProcess:
        name = name or f"w{len(self.workers)}"
        if isinstance(self.sqs, ExternalSQS):
            # The workers record their own beats: the endpoint's requests cannot be seen.
            conf = {**conf, "imports": [*conf.get("imports", ()), *self.sqs.worker_imports()]}
        env = {
            **self.sqs.worker_env(),
            "SQSHB_BROKER_URL": broker_url or self.sqs.broker_url,
            "SQSHB_CONFIG": json.dumps(conf),
            "SQSHB_EVENTS": str(self.events_path),
            "SQSHB_WORKER": name,
            "PYTHONPATH": os.pathsep.join([str(SUPPORT), str(EXAMPLES), *sys.path]),
            **(env or {}),
        }
        worker = WorkerProcess(
            "worker_app",
            pool=pool,
            concurrency=concurrency,
            name=name,
            env=env,
            queues=queues,
            cwd=SUPPORT,
            log_path=self.tmp / f"{name}.log",
            loglevel="INFO",
        )
        self.workers.append(worker)
        if start:
            worker.start()
        return worker

    def start_workers(self, conf: dict[str, Any], n: int = 2, **kwargs: Any) -> list[WorkerProcess]:
        started = [self.worker(conf, **kwargs) for _ in range(n)]
        for w in started:
            w.wait_ready(60)
        return started

    def send(
        self, conf: dict[str, Any], task: str, *args: Any, queue: str = "", **options: Any
    ) -> str:
        """Send *task* to the scenario's queue (or *queue*); its task id."""
        app = self.app(conf)
        return str(
            app.send_task(f"worker_app.{task}", args=args, queue=queue or self.queue, **options).id
        )

    def region_option(self) -> dict[str, str]:
        """kombu's ``region`` transport option where it matters: real SQS (kombu does not
        read ``AWS_DEFAULT_REGION``)."""
        if isinstance(self.sqs, ExternalSQS) and self.sqs.endpoint_url is None:
            return {"region": self.sqs.region}
        return {}

    def app(self, conf: dict[str, Any]) -> Celery:
        """A sending (and remote-controlling) app with the workers' settings."""
        key = json.dumps(conf, sort_keys=True)
        app = self._apps.get(key)
        if app is None:
            app = self._apps[key] = Celery("sender", broker=self.sqs.broker_url)
            app.conf.update(conf)
        return app

    # -- what happened ---------------------------------------------------------------

    def runs(self, task_id: str | None = None) -> list[Run]:
        if not self.events_path.exists():
            return []
        found = []
        for line in self.events_path.read_text().splitlines():
            e = json.loads(line)
            found.append(
                Run(
                    e["event"],
                    e["task_id"],
                    e["worker"],
                    e["at"],
                    e["retries"],
                    e.get("receipt_handle"),
                )
            )
        return [r for r in found if task_id is None or r.task_id == task_id]

    def starts(self, task_id: str | None = None) -> list[Run]:
        return [r for r in self.runs(task_id) if r.event == "start"]

    def queue_url(self) -> str:
        return str(self.sqs.client().get_queue_url(QueueName=self.queue)["QueueUrl"])

    def queue_counts(self) -> tuple[int, int]:
        """(visible, in flight) messages in the scenario's queue."""
        attrs = self.sqs.client().get_queue_attributes(
            QueueUrl=self.queue_url(),
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return (
            int(attrs["ApproximateNumberOfMessages"]),
            int(attrs["ApproximateNumberOfMessagesNotVisible"]),
        )

    def wait_settled(self, timeout: float) -> list[Run]:
        """Wait until every started run ended and the queue holds no message at all.

        From then on SQS cannot deliver the task again, so the runs recorded are final.
        """

        def settled() -> list[Run] | None:
            runs = self.runs()
            starts = sum(r.event == "start" for r in runs)
            ends = sum(r.event == "end" for r in runs)
            if starts and starts == ends and self.queue_counts() == (0, 0):
                return runs
            return None

        return wait_for(settled, timeout=timeout, what="every task to end and the queue to empty")

    def wait_starts(self, task_id: str, n: int, timeout: float) -> list[Run]:
        return wait_for(
            lambda: s if len(s := self.starts(task_id)) >= n else None,
            timeout=timeout,
            what=f"{n} start(s) of task {task_id}",
        )

    def beats(self, queue: str = "") -> list[RecordedRequest]:
        """Visibility changes the server answered for this scenario's queue (or *queue*)."""
        url_tail = f"/{queue or self.queue}"
        return [
            r
            for r in self.sqs.visibility_changes()
            if str(r.params.get("QueueUrl", "")).endswith(url_tail)
        ]

    def requests(self, *actions: str) -> list[RecordedRequest]:
        url_tail = f"/{self.queue}"
        return [
            r
            for r in self.sqs.requests(*actions)
            if str(r.params.get("QueueUrl", "")).endswith(url_tail)
        ]

    def logs(self) -> str:
        return "\n".join(f"--- {w.name}\n{w.log()}" for w in self.workers)

    def stop(self) -> None:
        for w in self.workers:
            w.kill()

    def delete_queues(self) -> None:
        """Delete every queue this scenario made: its name, with any suffix a test gave
        it (``.fifo``, a second queue). Only names with the tests' own prefix."""
        client = self.sqs.client()
        base = self.queue.removesuffix(".fifo")
        urls = client.list_queues(QueueNamePrefix=base).get("QueueUrls", [])
        for url in urls:
            client.delete_queue(QueueUrl=url)


@pytest.fixture
def scenario(sqs: SQS, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Scenario]:
    s = Scenario(sqs, tmp_path)
    yield s
    s.stop()
    s.delete_queues()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(s.logs()[-20000:])


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report


@pytest.fixture
def stubbed() -> Iterator[tuple[Any, Stubber]]:
    """An SQS client whose answers a unit test scripts (botocore's Stubber): for errors
    a server cannot produce."""
    client = boto3.client(
        "sqs", region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s"
    )
    with Stubber(client) as stubber:
        yield client, stubber


def hold_messages(client: Any, prefix: str, n: int = 2) -> tuple[str, list[str]]:
    """A fresh queue named after *prefix* with *n* messages received (in flight): its URL
    and their receipt handles."""
    url = client.create_queue(QueueName=f"{prefix}{uuid.uuid4().hex[:10]}")["QueueUrl"]
    for i in range(n):
        client.send_message(QueueUrl=url, MessageBody=str(i))
    handles: list[str] = []
    while len(handles) < n:
        got = client.receive_message(QueueUrl=url, MaxNumberOfMessages=n, WaitTimeSeconds=1)
        handles += [m["ReceiptHandle"] for m in got.get("Messages", [])]
    return url, handles
