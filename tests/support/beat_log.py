"""Worker-side evidence of beats, for SQS endpoints whose requests the tests cannot see.

Against moto the tests read the server's own request log. Against any other endpoint
(LocalStack, ElasticMQ, real SQS) they read this instead: every worker of an
:class:`~tests.sqs_endpoint.ExternalSQS` session loads this module through Celery's
``imports`` setting, and it appends one JSON line per accepted beat (``beat_sent``) and
per failed attempt (``beat_failed``) to the file named by ``SQSHB_BEATS``.

``beat_sent`` is sent once SQS accepted the change, so ``at`` is the time of the answer,
a little later than the time a server would record the request's arrival.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery_sqs_heartbeat import signals

#: The environment variable naming the file beats are appended to.
BEATS_ENV = "SQSHB_BEATS"


def _append(entry: dict[str, Any]) -> None:
    """Append one line; O_APPEND writes of one short line from many processes do not
    interleave, and prefork children write to the same file as their parent."""
    path = os.environ.get(BEATS_ENV)
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(entry) + "\n").encode())
    finally:
        os.close(fd)


def on_beat_sent(receipt_handle: str, queue_url: str, visibility_timeout: int, **_: Any) -> None:
    _append(
        {
            "at": time.time(),
            "status": 200,
            "queue_url": queue_url,
            "receipt_handle": receipt_handle,
            "visibility_timeout": visibility_timeout,
        }
    )


def on_beat_failed(receipt_handle: str, queue_url: str, failure: str, **_: Any) -> None:
    _append(
        {
            "at": time.time(),
            # Not the HTTP status (the signal does not carry it): any non-200 marks a
            # failed attempt, which is all the tests ask of it.
            "status": 400,
            "queue_url": queue_url,
            "receipt_handle": receipt_handle,
            "failure": failure,
        }
    )


signals.beat_sent.connect(on_beat_sent, weak=False)
signals.beat_failed.connect(on_beat_failed, weak=False)
