"""A fault-injecting HTTP proxy on loopback, in front of the tests' SQS server.

Workers use it as their broker endpoint, so every call goes through it; faults hit only
the calls they match (by default the heartbeat's ``ChangeMessageVisibility(Batch)``),
for a window of time, so the worker's own receives and deletes go on. Each fault the
proxy injected is recorded, so a test can show that the fault really happened.

Faults (what a stressed or broken SQS endpoint does):

* ``throttle``: HTTP 400 ``RequestThrottled``, as SQS answers a caller over its rate;
* ``error500`` / ``error503``: ``InternalError`` / ``ServiceUnavailable``;
* ``stall``: hold the request unanswered until the window ends, then reset it (the
  caller has usually given up by then). Never answering it keeps the outage exactly as
  long as the window: an answer at its end would reach a caller whose attempt began
  within its time-out of the end, and shorten the outage it sees;
* ``refuse``: reset the connection without an answer, as an endpoint that refuses or
  drops connections (the caller sees a connection error);
* ``unsupported``: HTTP 400 ``UnsupportedOperation``, as an SQS emulator without the
  action answers (GoAws has no ``ChangeMessageVisibilityBatch``).
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: The calls a fault hits unless told otherwise: the heartbeat's.
VISIBILITY_CALLS = frozenset({"ChangeMessageVisibility", "ChangeMessageVisibilityBatch"})
#: Headers that belong to one hop and are not forwarded.
HOP_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding", "proxy-connection"})

_ERRORS = {
    "throttle": (400, "RequestThrottled", "Sender", "Rate exceeded"),
    "error500": (500, "InternalError", "Receiver", "We encountered an internal error."),
    "error503": (503, "ServiceUnavailable", "Receiver", "Service is unavailable."),
    "unsupported": (400, "UnsupportedOperation", "Sender", "This action is not supported."),
}
#: The faults of an outage (``unsupported`` is a property of an endpoint, not an outage).
KINDS = ("throttle", "error500", "error503", "stall", "refuse")

Match = Callable[[str, dict[str, Any]], bool]


@dataclass(frozen=True)
class Injected:
    """One request the proxy answered with a fault instead of SQS."""

    kind: str
    action: str
    queue_url: str
    at: float


@dataclass
class _Fault:
    kind: str
    until: float
    match: Match


class FaultProxy:
    """Forwards HTTP requests to *upstream* (host, port), injecting the faults it is given."""

    def __init__(self, upstream: tuple[str, int], host: str = "127.0.0.1") -> None:
        self.upstream = upstream
        self.host = host
        self.port = 0
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._injected: list[Injected] = []
        self._stalled_now = 0
        self._server: _QuietServer | None = None
        self._thread: threading.Thread | None = None

    # -- control ---------------------------------------------------------------------

    def fault(
        self,
        kind: str,
        seconds: float,
        *,
        actions: frozenset[str] = VISIBILITY_CALLS,
        queue: str | None = None,
    ) -> None:
        """Answer matching requests with *kind* for the next *seconds*."""
        if kind not in (*KINDS, *_ERRORS):
            raise ValueError(f"unknown fault {kind!r}; one of {KINDS} or {tuple(_ERRORS)}")

        def match(action: str, params: dict[str, Any]) -> bool:
            url = str(params.get("QueueUrl", ""))
            return action in actions and (queue is None or url.endswith(f"/{queue}"))

        with self._lock:
            self._faults.append(_Fault(kind, time.monotonic() + seconds, match))

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def injected(self, kind: str | None = None) -> list[Injected]:
        with self._lock:
            return [i for i in self._injected if kind is None or i.kind == kind]

    @property
    def stalled_now(self) -> int:
        """Requests held by a ``stall`` fault at this moment."""
        with self._lock:
            return self._stalled_now

    @property
    def broker_url(self) -> str:
        return f"sqs://{self.host}:{self.port}"

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = _QuietServer((self.host, 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fault-proxy", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.clear()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the handler's side ------------------------------------------------------------

    def _fault_for(self, action: str, params: dict[str, Any]) -> _Fault | None:
        now = time.monotonic()
        with self._lock:
            self._faults = [f for f in self._faults if f.until > now]
            for fault in self._faults:
                if fault.match(action, params):
                    self._injected.append(
                        Injected(fault.kind, action, str(params.get("QueueUrl", "")), time.time())
                    )
                    return fault
        return None

    def _stall(self, fault: _Fault) -> None:
        with self._lock:
            self._stalled_now += 1
        try:
            while time.monotonic() < fault.until:
                with self._lock:
                    if fault not in self._faults:
                        break  # cleared
                time.sleep(0.05)
        finally:
            with self._lock:
                self._stalled_now -= 1


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a reset or a caller that gave up on a stall: expected here


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self._handle()

    def do_GET(self) -> None:
        self._handle()

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        action = self.headers.get("X-Amz-Target", "").rpartition(".")[2]
        try:
            params = json.loads(body) if body and action else {}
        except ValueError:
            params = {}
        fault = self.owner._fault_for(action, params)
        if fault is not None:
            if fault.kind == "refuse":
                self._reset()
                return
            if fault.kind in _ERRORS:
                self._answer_error(*_ERRORS[fault.kind])
                return
            self.owner._stall(fault)
            self._reset()
            return
        self._forward(body)

    def _forward(self, body: bytes) -> None:
        upstream = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            self.send_response(response.status, response.reason)
            for key, value in response.getheaders():
                if key.lower() not in HOP_HEADERS and key.lower() != "content-length":
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True  # the caller gave up (a stall outlived its time-out)
        finally:
            upstream.close()

    def _answer_error(self, status: int, code: str, fault: str, message: str) -> None:
        data = json.dumps({"__type": f"com.amazonaws.sqs#{code}", "message": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/x-amz-json-1.0")
        self.send_header("x-amzn-query-error", f"{code};{fault}")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _reset(self) -> None:
        """Close with a TCP reset and no answer."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()
