"""The package's metadata: one version, a license, what the README promises."""

from __future__ import annotations

import importlib.metadata

import pytest

import celery_sqs_heartbeat

pytestmark = pytest.mark.timeout(30)


def test_the_version_is_written_once() -> None:
    """pyproject reads ``__version__``; the installed metadata must agree with it."""
    assert importlib.metadata.version("celery-sqs-heartbeat") == celery_sqs_heartbeat.__version__


def test_the_metadata_names_the_license_and_the_project_urls() -> None:
    meta = importlib.metadata.metadata("celery-sqs-heartbeat")
    assert meta["License-Expression"] == "MIT"
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
    assert {"Homepage", "Documentation", "Changelog", "Issues"} <= set(urls)
