"""Run the integration suite against LocalStack's own SQS, started here on loopback.

``make test-localstack`` runs this with the project's virtual environment; LocalStack
runs from a virtual environment of its own (``--localstack-python``), since it needs a
newer Python than the project's lowest and dependencies the project must not pin.

LocalStack is started in host mode (no container) with only SQS, on a free port of
127.0.0.1, and the suite gets it through ``SQS_TEST_ENDPOINT``. Its default server
(twisted) binds every interface whatever ``GATEWAY_LISTEN`` says (it passes only the port
to ``TCP4ServerEndpoint``); the hypercorn server binds the host it is given, so
``GATEWAY_SERVER=hypercorn``. The script checks, from ``/proc``, that every socket
LocalStack listens on is on loopback before it runs a test, and stops LocalStack after.

Usage: ``python tests/support/run_on_localstack.py --localstack-python PATH [pytest args...]``
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

#: What LocalStack prints once its gateway answers.
READY_MARKER = "Ready."
#: How long LocalStack may take to start (imports and plugin discovery: ~10 s here).
START_TIMEOUT = 90
#: How long a SIGTERM'd LocalStack may take to shut down before it is killed.
STOP_TIMEOUT = 20
#: TCP state LISTEN in /proc/net/tcp*.
TCP_LISTEN = "0A"
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def localstack_env(port: int, state: Path) -> dict[str, str]:
    """LocalStack's settings: SQS only, on loopback, nothing fetched from the network."""
    return {
        **os.environ,
        "SERVICES": "sqs",
        # LocalStack takes this sandbox for a container (and would then default to
        # 0.0.0.0 and write under /var/lib/localstack): it is host mode.
        "OVERRIDE_IN_DOCKER": "0",
        # Queue URLs of the form http://host:port/account/queue, as the tests build them.
        "SQS_ENDPOINT_STRATEGY": "off",
        "GATEWAY_LISTEN": f"127.0.0.1:{port}",
        "LOCALSTACK_HOST": f"127.0.0.1:{port}",
        # The twisted server ignores GATEWAY_LISTEN's host; hypercorn binds it.
        "GATEWAY_SERVER": "hypercorn",
        # No DNS server (it would listen on 0.0.0.0:53), no analytics, no certificate
        # download: this machine reaches no network but package registries.
        "DNS_ADDRESS": "0",
        "DISABLE_EVENTS": "1",
        "SKIP_SSL_CERT_DOWNLOAD": "1",
        "FILESYSTEM_ROOT": str(state),
        "TMPDIR": str(state),
        "PYTHONUNBUFFERED": "1",
    }


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    return inodes


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    # /proc shows IPv6 as four host-order 32-bit words.
    words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]
    return ipaddress.IPv6Address(b"".join(words))


def listening_addresses(pid: int) -> list[tuple[str, str, int]]:
    """(protocol, address, port) of every socket *pid* listens on (TCP) or is bound to (UDP)."""
    inodes = _socket_inodes(pid)
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/net/{proto}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if inode not in inodes or (proto.startswith("tcp") and state != TCP_LISTEN):
                continue
            host, port = local.split(":")
            found.append((proto, str(_address(host)), int(port, 16)))
    return found


@contextlib.contextmanager
def localstack(python: str, log_path: Path) -> Iterator[str]:
    """LocalStack's SQS on a free loopback port, for the duration; its endpoint URL."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="localstack-") as state, open(log_path, "wb") as log:
        process = subprocess.Popen(
            [python, "-m", "localstack.runtime.main"],
            env=localstack_env(port, Path(state)),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while READY_MARKER not in log_path.read_text(errors="replace"):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"LocalStack did not start:\n{log_path.read_text(errors='replace')}"
                    )
                time.sleep(0.2)
            bound = listening_addresses(process.pid)
            exposed = [b for b in bound if not ipaddress.ip_address(b[1]).is_loopback]
            if exposed or not bound:
                raise RuntimeError(f"LocalStack must listen on loopback only: {bound}")
            print(f"LocalStack listening on {bound} (loopback only)", flush=True)
            yield f"http://127.0.0.1:{port}"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--localstack-python", required=True, help="python of LocalStack's venv")
    parser.add_argument("--log", default="localstack.log", help="LocalStack's output")
    args, pytest_args = parser.parse_known_args()
    with localstack(args.localstack_python, Path(args.log).resolve()) as endpoint:
        env = {**os.environ, "SQS_TEST_ENDPOINT": endpoint}
        command = [sys.executable, "-m", "pytest", "-m", "integration", *pytest_args]
        return subprocess.run(command, cwd=ROOT, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
