"""The SQS endpoint the integration tests run against: moto on loopback, or any other.

``SQS_TEST_ENDPOINT`` chooses it:

* unset: moto's server on a free loopback port (:class:`~celery_sqs_heartbeat.testing.SQSServer`),
  whose request log is the tests' evidence of what the workers asked of SQS;
* ``http://HOST:PORT``: an SQS-compatible server there (LocalStack, ElasticMQ, a moto
  server of your own), with the credentials and region of the environment, or dummy ones
  when the environment has none;
* ``aws``: real Amazon SQS in ``AWS_DEFAULT_REGION`` with the environment's credentials
  (boto3's usual chain: variables, profile, instance role).

Any endpoint but moto's is an :class:`ExternalSQS`. Its request log cannot be read, so it
offers the same :meth:`~ExternalSQS.visibility_changes` built from what the workers
themselves record (``tests/support/beat_log.py``: the heartbeat's ``beat_sent`` and
``beat_failed`` signals); tests that need other requests (deletes, kombu's own visibility
changes, the shape of batch requests) are marked ``needs_request_log`` and skipped.

Every queue a test makes is named ``SQS_TEST_QUEUE_PREFIX`` (default ``sqshb-test-``)
plus a random part, and is deleted after its test, so nothing of the account's own is
touched.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from celery_sqs_heartbeat.testing import FAKE_AWS_ENV, RecordedRequest

#: The environment variable naming the endpoint; unset means moto on loopback.
ENDPOINT_ENV = "SQS_TEST_ENDPOINT"
#: The endpoint value that means real Amazon SQS.
AWS = "aws"
#: The environment variable with the prefix of every queue the tests make.
PREFIX_ENV = "SQS_TEST_QUEUE_PREFIX"
DEFAULT_PREFIX = "sqshb-test-"
#: Actions the worker-side log can stand for: the heartbeat's own.
VISIBILITY_ACTIONS = frozenset({"ChangeMessageVisibility", "ChangeMessageVisibilityBatch"})
#: The module every worker of an external endpoint loads to record its beats.
BEAT_LOG_MODULE = "beat_log"
BEATS_ENV = "SQSHB_BEATS"


def queue_prefix() -> str:
    return os.environ.get(PREFIX_ENV, DEFAULT_PREFIX)


class ExternalSQS:
    """An SQS endpoint the tests do not run, with the interface of ``SQSServer`` they use."""

    #: No server-side request log: tests that need one are skipped.
    has_request_log = False

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.region = os.environ.get("AWS_DEFAULT_REGION") or FAKE_AWS_ENV["AWS_DEFAULT_REGION"]
        if endpoint == AWS:
            self.host, self.port = "", 0
            self.endpoint_url: str | None = None
        else:
            parts = urllib.parse.urlsplit(endpoint)
            if parts.scheme != "http" or not parts.hostname or not parts.port:
                raise ValueError(
                    f"{ENDPOINT_ENV}={endpoint!r}: expected http://HOST:PORT or {AWS!r}"
                )
            self.host, self.port = parts.hostname, parts.port
            self.endpoint_url = f"http://{self.host}:{self.port}"
        self._dir = Path(tempfile.mkdtemp(prefix="sqshb-beats-"))
        self.beats_path = self._dir / "beats.jsonl"
        #: Queues that were there before the tests: any other left at the end is reported.
        self._before: set[str] = set()

    def start(self) -> ExternalSQS:
        if self.endpoint != AWS:
            # Local emulators accept any credentials; real SQS needs the user's own.
            for name, value in FAKE_AWS_ENV.items():
                os.environ.setdefault(name, value)
        self._before = set(self._queue_urls())
        return self

    def stop(self) -> None:
        for path in self._dir.iterdir():
            path.unlink()
        self._dir.rmdir()
        # Scenarios delete their own queues; say so if anything else was left behind.
        left = sorted(set(self._queue_urls()) - self._before)
        if left:
            sys.stderr.write(f"queues made during the tests and left on {self.endpoint}: {left}\n")

    def _queue_urls(self) -> list[str]:
        pages = self.client().get_paginator("list_queues").paginate()
        return [url for page in pages for url in page.get("QueueUrls", [])]

    def __enter__(self) -> ExternalSQS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def broker_url(self) -> str:
        # kombu: an empty host is Amazon's endpoint for the region; a host is plain HTTP.
        return "sqs://" if self.endpoint == AWS else f"sqs://{self.host}:{self.port}"

    def worker_env(self) -> dict[str, str]:
        env = {BEATS_ENV: str(self.beats_path)}
        if self.endpoint != AWS:
            env.update({k: os.environ.get(k, v) for k, v in FAKE_AWS_ENV.items()})
        return env

    def worker_imports(self) -> list[str]:
        """Modules every worker loads: the beat recorder."""
        return [BEAT_LOG_MODULE]

    def client(self) -> Any:
        import boto3

        return boto3.client("sqs", endpoint_url=self.endpoint_url, region_name=self.region)

    def requests(self, *actions: str) -> list[RecordedRequest]:
        """The heartbeat's visibility changes, as the workers recorded them.

        Other requests are not seen: a test that needs them is marked ``needs_request_log``.
        """
        if not actions or set(actions) - VISIBILITY_ACTIONS:
            raise RuntimeError(
                f"{sorted(set(actions) - VISIBILITY_ACTIONS) or 'every request'} cannot be seen "
                f"on {self.endpoint}: mark the test needs_request_log"
            )
        return self.visibility_changes()

    def visibility_changes(
        self, receipt_handles: Sequence[str] | None = None
    ) -> list[RecordedRequest]:
        """One ``ChangeMessageVisibility`` per beat the workers recorded, in time order."""
        if not self.beats_path.exists():
            return []
        found = []
        for line in self.beats_path.read_text().splitlines():
            entry = json.loads(line)
            params: dict[str, Any] = {
                "QueueUrl": entry["queue_url"],
                "ReceiptHandle": entry["receipt_handle"],
            }
            if "visibility_timeout" in entry:
                params["VisibilityTimeout"] = entry["visibility_timeout"]
            found.append(
                RecordedRequest("ChangeMessageVisibility", params, entry["status"], entry["at"])
            )
        found.sort(key=lambda r: r.at)
        if receipt_handles is None:
            return found
        wanted = set(receipt_handles)
        return [r for r in found if wanted & set(r.receipt_handles)]
