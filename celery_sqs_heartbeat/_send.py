"""Sending visibility changes: one request to one queue, with every error classified.

A request of several entries is one ``ChangeMessageVisibilityBatch``. An endpoint that
does not implement that action (some SQS emulators) is remembered, said once at INFO,
and sent single ``ChangeMessageVisibility`` calls from then on. Nothing here raises:
each entry comes back with its own :class:`Answer`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ._errors import Failure, classify_batch_entry, classify_exception, describe, is_unsupported
from ._quiet import quietly

logger = logging.getLogger("celery_sqs_heartbeat")

#: SQS takes at most ten entries in one ChangeMessageVisibilityBatch.
MAX_BATCH = 10

#: The client to use for a queue URL (a predefined queue may have its own credentials).
ClientSource = Callable[[str], Any]


@dataclass(frozen=True, slots=True)
class Answer:
    """What SQS said of one entry: accepted (no failure), or its failure class."""

    failure: Failure | None = None
    #: The error's code and message, for logs and signals.
    detail: str = ""
    #: The exception behind a failure, for a traceback where it is unexpected.
    error: BaseException | None = None


#: The answer to an entry SQS accepted.
ACCEPTED = Answer()


class Sender:
    """Sends visibility changes with the clients of *clients*; safe from any thread."""

    def __init__(self, clients: ClientSource) -> None:
        self._clients = clients
        self._lock = threading.Lock()
        #: Endpoints that answered the batch action with "unsupported".
        self._no_batch: set[str] = set()

    @quietly  # no OpenTelemetry span for the heartbeat's own calls (_quiet.py)
    def send(self, queue_url: str, entries: Sequence[tuple[str, int]]) -> list[Answer]:
        """Ask SQS to keep each (receipt handle, seconds) of *queue_url* hidden; one
        answer per entry, in order."""
        try:
            client = self._clients(queue_url)
        except Exception as exc:
            return _failed(exc, len(entries))
        endpoint = str(getattr(getattr(client, "meta", None), "endpoint_url", ""))
        if len(entries) > 1 and endpoint not in self._no_batch:
            try:
                return _batch(client, queue_url, entries)
            except Exception as exc:
                if not is_unsupported(exc):
                    return _failed(exc, len(entries))
                with self._lock:
                    first = endpoint not in self._no_batch
                    self._no_batch.add(endpoint)
                if first:
                    logger.info(
                        "celery-sqs-heartbeat: %s does not support "
                        "ChangeMessageVisibilityBatch (%s); sending one call per message.",
                        endpoint or "the SQS endpoint",
                        describe(exc),
                    )
        return [_single(client, queue_url, handle, seconds) for handle, seconds in entries]


def _single(client: Any, queue_url: str, receipt_handle: str, seconds: int) -> Answer:
    try:
        client.change_message_visibility(
            QueueUrl=queue_url, ReceiptHandle=receipt_handle, VisibilityTimeout=seconds
        )
    except Exception as exc:
        return _failed(exc, 1)[0]
    return ACCEPTED


def _batch(client: Any, queue_url: str, entries: Sequence[tuple[str, int]]) -> list[Answer]:
    response = client.change_message_visibility_batch(
        QueueUrl=queue_url,
        Entries=[
            {"Id": str(i), "ReceiptHandle": handle, "VisibilityTimeout": seconds}
            for i, (handle, seconds) in enumerate(entries)
        ],
    )
    failed = {f.get("Id"): f for f in response.get("Failed", ())}
    found = [failed.get(str(i)) for i in range(len(entries))]
    return [
        ACCEPTED
        if f is None
        else Answer(classify_batch_entry(f), f"{f.get('Code')}: {f.get('Message', '')}")
        for f in found
    ]


def _failed(exc: BaseException, n: int) -> list[Answer]:
    return [Answer(classify_exception(exc), describe(exc), exc)] * n
