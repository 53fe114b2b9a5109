"""``celery sqs-heartbeat check``: will the heartbeat work against this broker?

Reads the app's settings and asks SQS about each queue the tasks route to, without
touching any message: the permission probe changes the visibility of a receipt handle
that cannot exist, which SQS answers with "invalid handle" when the call is allowed and
with ``AccessDenied`` when it is not.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import celery
import kombu

from ._client import BrokerInfo, Clients, call_timeout
from ._errors import Failure, classify_exception, queue_arn
from ._heartbeat import START_ALLOWANCE, grid
from ._settings import (
    ConfigurationError,
    HeartbeatOptions,
    resolve_tasks,
    shortest_interval,
    task_rows,
)

#: A well-formed receipt handle no message can have, for the permission probe.
PROBE_RECEIPT_HANDLE = "celery-sqs-heartbeat-permission-probe"
#: The visibility the probe asks for; not 0, though no message can match the handle.
PROBE_VISIBILITY = 30
#: The first Celery series with the soft shutdown (``worker_soft_shutdown_timeout``),
#: whose cold shutdown hands the running tasks' messages back rather than deleting them.
SOFT_SHUTDOWN_SERIES = (5, 5)
#: The first series that sends a finished task's ack at once in a threads, gevent or
#: eventlet worker (kombu's hub wakes for a pool thread's ``call_soon``; Celery's
#: ``call_soon_ack``). Before it the ack waits for the event loop's next turn.
PROMPT_ACK_SERIES = (5, 7)
#: kombu's SQS long poll when ``wait_time_seconds`` is not set.
KOMBU_WAIT_TIME_SECONDS = 10


@dataclass
class QueueReport:
    name: str
    url: str | None = None
    exists: bool = False
    fifo: bool = False
    visibility_timeout: int | None = None
    max_receive_count: int | None = None
    first_beat: float | None = None
    permission: str = "unknown"
    tasks: list[str] = field(default_factory=list)


@dataclass
class Report:
    broker: dict[str, Any] = field(default_factory=dict)
    tasks: list[dict[str, Any]] = field(default_factory=list)
    queues: list[QueueReport] = field(default_factory=list)
    worker: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check(app: Any) -> Report:
    """Everything the preflight check finds; ``problems`` empty means good to go."""
    report = Report()
    try:
        options = resolve_tasks(app)
    except ConfigurationError as exc:
        report.problems.append(str(exc))
        return report
    broker = BrokerInfo.from_app(app)
    if broker is None:
        report.problems.append(
            f"the broker ({app.conf.broker_url!r}) is not SQS: the heartbeat does nothing"
        )
        return report
    transport = broker.transport_options
    report.broker = {
        "endpoint": broker.endpoint_url or "AWS default",
        "region": broker.region(),
        "queue_name_prefix": transport.get("queue_name_prefix", ""),
        "predefined_queues": sorted(transport.get("predefined_queues") or {}),
        "visibility_timeout": transport.get("visibility_timeout"),
    }
    report.tasks = task_rows(app, options)
    queues: dict[str, QueueReport] = {}
    for row in report.tasks:
        if not row["enabled"]:
            continue
        q = queues.setdefault(row["queue"], QueueReport(row["queue"]))
        q.tasks.append(row["task"])
        # The queue's own timeout covers a message until its first beat (the first grid
        # point an interval after its receipt), and the moment before the worker sees it.
        first = row["interval"] + grid(row["interval"]) + START_ALLOWANCE
        q.first_beat = first if q.first_beat is None else max(q.first_beat, first)
        if not row["acks_late"]:
            report.problems.append(
                f"task {row['task']} has the heartbeat on but not acks_late: its message is "
                "deleted before it runs"
            )
    if not queues:
        report.notes.append("no task has the heartbeat enabled (sqs_heartbeat_enabled)")
    enabled = [o for o in options.values() if o.enabled]
    clients = Clients(broker, timeout=call_timeout(shortest_interval(app, options)))
    for q in queues.values():
        _check_queue(q, broker, clients, report)
    report.queues = list(queues.values())
    _check_worker_settings(app, enabled, transport, report)
    return report


def _queue_url(name: str, broker: BrokerInfo, client: Any) -> str | None:
    predefined = (broker.transport_options.get("predefined_queues") or {}).get(name)
    if predefined:
        return str(predefined["url"])
    sqs_name = str(broker.transport_options.get("queue_name_prefix", "")) + name
    try:
        return str(client.get_queue_url(QueueName=sqs_name)["QueueUrl"])
    except Exception as exc:
        if classify_exception(exc) is Failure.GONE:
            return None
        raise


def _check_queue(q: QueueReport, broker: BrokerInfo, clients: Clients, report: Report) -> None:
    try:
        q.url = _queue_url(q.name, broker, clients.for_queue(""))
    except Exception as exc:
        report.problems.append(f"queue {q.name}: cannot look it up ({exc})")
        return
    if q.url is None:
        timeout = broker.transport_options.get("visibility_timeout", 1800)
        report.notes.append(
            f"queue {q.name} does not exist yet; kombu will create it with a visibility "
            f"timeout of {timeout} s"
        )
        if q.first_beat is not None and float(timeout) < q.first_beat:
            report.problems.append(
                f"queue {q.name} will be created with a visibility timeout of {timeout} s, "
                f"shorter than the first beat ({q.first_beat:g} s after a message's receipt)"
            )
        return
    q.exists = True
    client = clients.for_queue(q.url)
    try:
        attributes = client.get_queue_attributes(QueueUrl=q.url, AttributeNames=["All"])[
            "Attributes"
        ]
    except Exception as exc:
        report.problems.append(f"queue {q.name}: cannot read its attributes ({exc})")
        attributes = {}
    if attributes:
        q.visibility_timeout = int(attributes.get("VisibilityTimeout", 30))
        q.fifo = attributes.get("FifoQueue") == "true"
        redrive = attributes.get("RedrivePolicy")
        if redrive:
            q.max_receive_count = int(json.loads(redrive).get("maxReceiveCount", 0)) or None
        if q.first_beat is not None and q.visibility_timeout < q.first_beat:
            report.problems.append(
                f"queue {q.name} hides a message for {q.visibility_timeout} s, but its tasks' "
                f"first beat comes up to {q.first_beat:g} s after receipt: raise the queue's "
                "VisibilityTimeout or lower sqs_heartbeat_interval"
            )
        if q.fifo:
            report.notes.append(f"queue {q.name} is FIFO: a running task holds its message group")
    q.permission = _probe(client, q.url)
    if q.permission.startswith("unknown"):
        report.notes.append(f"queue {q.name}: permission probe inconclusive: {q.permission}")
    if q.permission == "denied":
        report.problems.append(
            f"queue {q.name}: sqs:ChangeMessageVisibility is denied; add "
            f'{{"Effect": "Allow", "Action": "sqs:ChangeMessageVisibility", '
            f'"Resource": "{queue_arn(q.url, clients.region)}"}}'
        )


def _probe(client: Any, url: str) -> str:
    """ "allowed", "denied" or "unknown (...)", from a change no message can match."""
    try:
        client.change_message_visibility(
            QueueUrl=url, ReceiptHandle=PROBE_RECEIPT_HANDLE, VisibilityTimeout=PROBE_VISIBILITY
        )
    except Exception as exc:
        failure = classify_exception(exc)
        if failure is Failure.DENIED:
            return "denied"
        if failure is Failure.GONE:
            return "allowed"  # SQS got as far as checking the handle
        return f"unknown ({exc})"
    return "allowed"


def _check_worker_settings(
    app: Any, enabled: list[HeartbeatOptions], transport: Mapping[str, Any], report: Report
) -> None:
    conf = app.conf
    report.worker = {
        "worker_prefetch_multiplier": conf.worker_prefetch_multiplier,
        "worker_disable_prefetch": bool(conf.get("worker_disable_prefetch")),
        "task_acks_on_failure_or_timeout": conf.task_acks_on_failure_or_timeout,
        "task_reject_on_worker_lost": conf.task_reject_on_worker_lost,
    }
    if not enabled:
        return
    if conf.worker_prefetch_multiplier > 1 and not conf.get("worker_disable_prefetch"):
        report.notes.append(
            f"worker_prefetch_multiplier={conf.worker_prefetch_multiplier}: prefetched "
            "messages are beaten from their receipt while they wait, but not "
            "in a solo, gevent or eventlet worker, where Celery sees them only once the "
            "pool can start them: run those with worker_prefetch_multiplier=1"
        )
    if not conf.task_acks_on_failure_or_timeout:
        report.notes.append(
            "task_acks_on_failure_or_timeout=False: failed tasks' messages are rejected, "
            "and deleted unless the queue has a redrive policy"
        )
    if conf.task_reject_on_worker_lost:
        report.notes.append(
            "task_reject_on_worker_lost=True: a task whose pool process dies is requeued "
            "at once and may run again"
        )
    report.notes += shutdown_notes(conf, celery.VERSION[:2])
    report.notes += ack_lag_notes(
        enabled,
        transport.get("wait_time_seconds", KOMBU_WAIT_TIME_SECONDS),
        min(tuple(celery.VERSION[:2]), tuple(kombu.VERSION[:2])),
    )


def ack_lag_notes(
    enabled: list[HeartbeatOptions], wait_time_seconds: float, series: tuple[int, int]
) -> list[str]:
    """Where a finished task's ack may come after its message's visibility runs out.

    The heartbeat ends when the task does, and leaves the message hidden for at least
    window - interval. Before 5.7, a threads, gevent or eventlet worker sends the ack only
    at its event loop's next turn, which may wait for kombu's long poll.
    """
    if series >= PROMPT_ACK_SERIES or not enabled:
        return []
    margin = min(o.visibility_timeout - o.interval for o in enabled)
    if margin > wait_time_seconds:
        return []
    return [
        f"the heartbeat's margin (window - interval, {margin:g} s) is not above kombu's "
        f"wait_time_seconds ({wait_time_seconds:g} s): before Celery and kombu 5.7, a "
        "threads, gevent or eventlet worker acknowledges a finished task only at its "
        "event loop's next turn, up to that long after, and a message whose visibility "
        "runs out first is delivered again. Widen the window or shorten wait_time_seconds"
    ]


def shutdown_notes(conf: Any, series: tuple[int, int]) -> list[str]:
    """What a shutdown recipe does on this Celery *series* that loses a task.

    Before 5.5 Celery has no soft shutdown, and its cold shutdown kills the prefork
    pool's children: each running ``acks_late`` task ends in ``WorkerLostError``, whose
    message Celery acknowledges (deletes) unless ``task_reject_on_worker_lost`` is set.
    """
    if series >= SOFT_SHUTDOWN_SERIES:
        return []
    notes = []
    if conf.get("worker_soft_shutdown_timeout"):
        notes.append(
            f"worker_soft_shutdown_timeout has no effect on Celery {series[0]}.{series[1]} "
            "(it came in 5.5): a cold shutdown stops the running tasks at once"
        )
    if not conf.task_reject_on_worker_lost:
        notes.append(
            f"Celery {series[0]}.{series[1]} with task_reject_on_worker_lost=False: a cold "
            "shutdown (SIGQUIT, or SIGTERM with REMAP_SIGTERM=SIGQUIT) deletes the message "
            "of each running task, which is lost. Stop workers warm (plain SIGTERM, a grace "
            "period that covers the longest task), or set task_reject_on_worker_lost=True"
        )
    return notes
