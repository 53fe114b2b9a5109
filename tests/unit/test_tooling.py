"""The project's own tooling: LocalStack's loopback check and the matrix's table."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sys
from pathlib import Path

import pytest

from ..support.run_on_localstack import _address, listening_addresses

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]


def test_proc_addresses_decode_to_loopback() -> None:
    """/proc/net/tcp* write addresses in host byte order, 32 bits at a time."""
    assert _address("0100007F") == ipaddress.ip_address("127.0.0.1")
    assert _address("00000000000000000000000001000000") == ipaddress.ip_address("::1")
    assert _address("00000000") == ipaddress.ip_address("0.0.0.0")


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux's /proc")
def test_listening_addresses_sees_this_process_listen() -> None:
    with socket.socket() as loopback, socket.socket() as anywhere:
        loopback.bind(("127.0.0.1", 0))
        loopback.listen()
        anywhere.bind(("0.0.0.0", 0))
        anywhere.listen()
        found = set(listening_addresses(os.getpid()))
        assert ("tcp", "127.0.0.1", loopback.getsockname()[1]) in found
        assert ("tcp", "0.0.0.0", anywhere.getsockname()[1]) in found


def test_matrix_table_merges_reports_and_names_missing_cells(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no versions recorded by a real run
    pytest.importorskip("nox", reason="the matrix's cells do not install nox")
    sys.path.insert(0, str(ROOT))
    try:
        import noxfile
    finally:
        sys.path.remove(str(ROOT))
    report = tmp_path / "report.json"
    sessions = [
        {"name": "compat", "signatures": [f"compat-{cell}", "compat-3.x"], "result": result}
        for cell, result in [("3.10(celery='5.4')", "success"), ("3.13(celery='5.7')", "failed")]
    ]
    report.write_text(json.dumps({"sessions": sessions}))
    table = noxfile.table([report]).splitlines()
    assert table[0].startswith("| Python | Celery 5.4 |")
    row_310 = next(line for line in table if line.startswith("| 3.10 |"))
    row_313 = next(line for line in table if line.startswith("| 3.13 |"))
    assert row_310.split(" | ")[1].startswith("success")
    assert row_313.rstrip(" |").endswith("failed")
    assert "not run" in row_310
