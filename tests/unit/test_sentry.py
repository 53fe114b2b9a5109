"""Sentry: what its boto3 and stdlib integrations record of the heartbeat's SQS calls.

With the real SDK (default integrations, so stdlib's httplib and threading's scope
propagation, plus boto3's), a transport that keeps every envelope in memory, and SQS
calls to the session's real endpoint. The threads are laid out as in a worker: the
heartbeat's thread starts at worker start, outside any task, and sends its calls on a
``ThreadPoolExecutor``; the task runs in an isolation scope and transaction of its own,
as Sentry's Celery integration makes them.

What they prove: beats made while a task runs put no breadcrumb into the task's events
and no span into its transaction, with nothing done by the heartbeat for it; a task's
own ``extend()`` is, like any SQS call the task makes, a span of its transaction.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

sentry_sdk = pytest.importorskip("sentry_sdk")

from sentry_sdk.envelope import Envelope  # noqa: E402
from sentry_sdk.integrations.boto3 import Boto3Integration  # noqa: E402
from sentry_sdk.transport import Transport  # noqa: E402

from celery_sqs_heartbeat._send import Sender  # noqa: E402

from ..conftest import SQS, hold_messages  # noqa: E402

pytestmark = pytest.mark.timeout(60)

VISIBILITY = 60


class Recorder(Transport):
    """Keeps what the SDK would send."""

    def __init__(self) -> None:
        super().__init__()
        self.envelopes: list[Envelope] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        self.envelopes.append(envelope)

    def events(self) -> list[dict[str, Any]]:
        return [e.get_event() for e in self.envelopes if e.get_event() is not None]

    def transactions(self) -> list[dict[str, Any]]:
        return [t for e in self.envelopes if (t := e.get_transaction_event()) is not None]


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    recorder = Recorder()
    sentry_sdk.init(
        dsn="https://public@sentry.example.com/1",
        transport=recorder,
        traces_sample_rate=1.0,
        # boto3's, and no others: moto's server runs in this process, and the Flask
        # integration would make a transaction of each request it answers.
        auto_enabling_integrations=False,
        integrations=[Boto3Integration()],
    )
    yield recorder
    sentry_sdk.get_client().close()
    sentry_sdk.get_global_scope().set_client(None)  # the SDK's patches stay, inert


@pytest.fixture
def held(sqs: SQS) -> Iterator[tuple[Any, str, list[str]]]:
    client = sqs.client()
    url, handles = hold_messages(client, "sentry")
    yield client, url, handles
    client.delete_queue(QueueUrl=url)


class Heartbeat:
    """The sidecar's layout: one thread started outside any task, calls on its pool."""

    def __init__(self, sender: Sender) -> None:
        self.sender = sender
        self.due: list[tuple[str, list[tuple[str, int]]]] = []
        self.wake, self.done = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with ThreadPoolExecutor(2) as executor:
            self.wake.wait()
            for url, entries in self.due:
                answers = executor.submit(self.sender.send, url, entries).result()
                assert [a.failure for a in answers] == [None] * len(entries)
            self.done.set()

    def beat(self, url: str, *entries: list[tuple[str, int]]) -> None:
        self.due = [(url, e) for e in entries]
        self.wake.set()
        assert self.done.wait(20)


def http_breadcrumbs(event: dict[str, Any]) -> list[dict[str, Any]]:
    return [b for b in event["breadcrumbs"]["values"] if b.get("type") == "http"]


def test_beats_during_a_task_leave_no_trace_in_its_events(
    held: tuple[Any, str, list[str]], recorder: Recorder
) -> None:
    client, url, handles = held
    heartbeat = Heartbeat(Sender(lambda _: client))  # at worker start

    with (
        sentry_sdk.isolation_scope(),
        sentry_sdk.start_transaction(op="queue.task.celery", name="proj.transcode"),
    ):
        sentry_sdk.add_breadcrumb(category="task", message="transcoding")
        heartbeat.beat(url, [(h, VISIBILITY) for h in handles], [(handles[0], VISIBILITY)])
        sentry_sdk.capture_message("the task's own event")

    (event,) = recorder.events()
    assert [b.get("message") for b in event["breadcrumbs"]["values"]] == ["transcoding"]
    (transaction,) = recorder.transactions()  # no other: a beat starts none
    assert transaction["transaction"] == "proj.transcode"
    assert transaction["spans"] == []


def test_a_tasks_own_extend_is_a_span_of_its_transaction(
    held: tuple[Any, str, list[str]], recorder: Recorder
) -> None:
    client, url, handles = held

    with (
        sentry_sdk.isolation_scope(),
        sentry_sdk.start_transaction(op="queue.task.celery", name="proj.transcode"),
    ):
        assert Sender(lambda _: client).send(url, [(handles[0], VISIBILITY)])[0].failure is None
        sentry_sdk.capture_message("the task's own event")

    (event,) = recorder.events()
    assert http_breadcrumbs(event)  # the task's own call, in the task's scope
    (transaction,) = recorder.transactions()
    calls = [s for s in transaction["spans"] if s.get("origin") == "auto.http.boto3"]
    assert [s["description"] for s in calls] == ["aws.sqs.ChangeMessageVisibility"], calls
