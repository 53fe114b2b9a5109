"""Real parts for integration tests: an SQS server on loopback and real worker processes.

Needs the ``testing`` extra (``pip install celery-sqs-heartbeat[testing]``), which brings
moto's server. Used by this package's own tests and demo, and usable in yours::

    with SQSServer() as sqs, WorkerProcess("proj.celery", env=sqs.worker_env()) as worker:
        ...  # send tasks with broker_url=sqs.broker_url
        beats = sqs.requests("ChangeMessageVisibility")

:class:`SQSServer` records every request it answers, so a test can check what the
workers really asked of SQS (the beats) and when.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["RecordedRequest", "SQSServer", "WorkerProcess", "wait_for"]

T = TypeVar("T")

#: Credentials and region the workers and clients use against the loopback server;
#: moto accepts any.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
#: What ``celery worker`` logs once it consumes.
READY_MARKER = " ready."


def wait_for(
    predicate: Callable[[], T], *, timeout: float, interval: float = 0.05, what: str = ""
) -> T:
    """Poll *predicate* until it returns a true value; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        time.sleep(interval)


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server answered."""

    action: str
    params: Mapping[str, Any]
    status: int
    #: Wall-clock time (``time.time()``) the request arrived, comparable with times the
    #: workers' processes record.
    at: float
    #: Wall-clock time the answer was ready: for a long-polling ReceiveMessage, when SQS
    #: handed the messages over and their visibility timeout began.
    answered: float = 0.0
    #: Receipt handles a ReceiveMessage answer carried, in order.
    received: tuple[str, ...] = ()

    @property
    def receipt_handles(self) -> list[str]:
        """The receipt handles a (batch) visibility change named."""
        if "ReceiptHandle" in self.params:
            return [str(self.params["ReceiptHandle"])]
        return [str(e["ReceiptHandle"]) for e in self.params.get("Entries", ())]


@dataclass
class _Recorder:
    app: Any
    requests: list[RecordedRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        at = time.time()
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        action = target.rpartition(".")[2]
        params: dict[str, Any] = {}
        if action and body:
            try:
                params = json.loads(body)
            except ValueError:
                params = {}
        status: list[int] = []

        def recording_start_response(code: str, headers: Any, *args: Any) -> Any:
            status.append(int(code.split()[0]))
            return start_response(code, headers, *args)

        result = self.app(environ, recording_start_response)
        answered = time.time()
        received: tuple[str, ...] = ()
        if action == "ReceiveMessage" and status[0] == 200:
            # Only these answers are read (and so buffered): they say which receipt
            # began when, which a request alone cannot.
            body = b"".join(result)
            if hasattr(result, "close"):
                result.close()
            result = [body]
            with contextlib.suppress(ValueError, AttributeError, KeyError, TypeError):
                received = tuple(m["ReceiptHandle"] for m in json.loads(body)["Messages"])
        if action:
            with self.lock:
                self.requests.append(
                    RecordedRequest(action, params, status[0], at, answered, received)
                )
        return result


class SQSServer:
    """moto's SQS server on a free loopback port, recording the requests it answers."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._recorder: _Recorder | None = None

    def start(self) -> SQSServer:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        # One access-log line per request would drown the workers' own output.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._recorder = _Recorder(DomainDispatcherApplication(create_backend_app))
        self._server = make_server(
            self.host,
            self.port,
            self._recorder,
            threaded=True,
            request_handler=MotoRequestHandler,
        )
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="moto-sqs-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> SQSServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def broker_url(self) -> str:
        """A Celery broker URL for this server."""
        return f"sqs://{self.host}:{self.port}"

    def worker_env(self) -> dict[str, str]:
        """Environment variables a worker needs to reach this server."""
        return dict(FAKE_AWS_ENV)

    def client(self) -> Any:
        """A boto3 SQS client for this server."""
        import boto3

        return boto3.client(
            "sqs",
            endpoint_url=self.endpoint_url,
            region_name=FAKE_AWS_ENV["AWS_DEFAULT_REGION"],
            aws_access_key_id=FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        )

    def requests(self, *actions: str) -> list[RecordedRequest]:
        """Requests answered so far, in order, only those of *actions* when given."""
        assert self._recorder is not None, "start() the server first"
        with self._recorder.lock:
            found = list(self._recorder.requests)
        return [r for r in found if not actions or r.action in actions]

    def visibility_changes(
        self, receipt_handles: Sequence[str] | None = None
    ) -> list[RecordedRequest]:
        """Answered ChangeMessageVisibility(Batch) requests, optionally for some handles."""
        found = self.requests("ChangeMessageVisibility", "ChangeMessageVisibilityBatch")
        if receipt_handles is None:
            return found
        wanted = set(receipt_handles)
        return [r for r in found if wanted & set(r.receipt_handles)]


class WorkerProcess:
    """A real ``celery worker`` process, with its output in a log file.

    It is started in a session of its own, so :meth:`kill` takes the whole worker
    (prefork children included) down at once, as an out-of-memory kill would.
    """

    def __init__(
        self,
        app: str,
        *,
        pool: str = "prefork",
        concurrency: int = 1,
        name: str = "worker",
        queues: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        loglevel: str = "INFO",
        cwd: str | os.PathLike[str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.name = name
        self.argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            app,
            "worker",
            f"--pool={pool}",
            f"--concurrency={concurrency}",
            f"--hostname={name}@%h",
            f"--loglevel={loglevel}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            *(["--queues", ",".join(queues)] if queues else []),
            *extra_args,
        ]
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.cwd = cwd
        if log_path is None:
            fd, log_name = tempfile.mkstemp(prefix=f"{name}-", suffix=".log")
            os.close(fd)
            log_path = log_name
        self.log_path = Path(log_path)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                stdin=subprocess.DEVNULL,
            )
        return self

    def wait_ready(self, timeout: float = 30) -> WorkerProcess:
        """Wait until the worker consumes; fail early if it exits."""

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"worker {self.name} exited with {self.process.returncode}:\n{self.log()}"
                )
            return READY_MARKER in self.log()

        wait_for(ready, timeout=timeout, what=f"worker {self.name} to be ready")
        return self

    def __enter__(self) -> WorkerProcess:
        return self.start().wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines(self, contains: str) -> list[str]:
        return [line for line in self.log().splitlines() if contains in line]

    @property
    def pid(self) -> int:
        assert self.process is not None, "start() the worker first"
        return self.process.pid

    def wait(self, timeout: float) -> int:
        """Wait for the worker to exit by itself; its exit status."""
        assert self.process is not None, "start() the worker first"
        return self.process.wait(timeout)

    def stop(self, timeout: float = 20) -> int | None:
        """Warm shutdown (SIGTERM), then SIGKILL if it takes longer than *timeout*."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the worker and every process of its session, with no chance to clean up."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
