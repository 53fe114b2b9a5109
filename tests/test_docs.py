"""The settings tables in the README and the configuration reference match the code."""

from __future__ import annotations

from pathlib import Path

import pytest

import celery_sqs_heartbeat
from celery_sqs_heartbeat import SETTINGS

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parent.parent


def settings_table(path: Path) -> dict[str, tuple[str, str, str]]:
    rows = {}
    for line in path.read_text().splitlines():
        if line.startswith("| `sqs_heartbeat_"):
            name, type_, default, meaning = (c.strip() for c in line.strip("|").split("|"))
            rows[name.strip("`")] = (type_, default.strip("`"), meaning)
    return rows


@pytest.mark.parametrize("doc", ["README.md", "docs/configuration.md"])
def test_settings_table_matches_the_code(doc: str) -> None:
    expected = {s.name: (s.type, repr(s.default), s.meaning) for s in SETTINGS}
    assert settings_table(ROOT / doc) == expected


def test_public_api() -> None:
    for name in celery_sqs_heartbeat.__all__:
        assert getattr(celery_sqs_heartbeat, name) is not None
    assert (ROOT / "celery_sqs_heartbeat" / "py.typed").exists()
