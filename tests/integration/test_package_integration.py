"""The built wheel, installed on its own, heartbeats a real worker with no code.

The wheel is built from this checkout (not an editable install) and installed into a
fresh virtual environment with nothing but its runtime dependencies: no moto, no test
tools, not this checkout on ``sys.path``. Its ``celery worker`` runs the tests' app
(``worker_app``, which does not import the package) against the tests' SQS endpoint, so
only the ``celery`` command's plugin can switch the heartbeat on.
"""

from __future__ import annotations

import json
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from ..conftest import ROOT, SUPPORT, Scenario
from .test_worker_integration import QUEUE_TIMEOUT, TASK_SECONDS, beats_for

pytestmark = pytest.mark.timeout(600)


INTERVAL = 0.5
VISIBILITY = 2
#: Building the wheel and installing its dependencies: downloads when the cache is cold.
INSTALL_TIMEOUT = 480
#: Distributions the tests' own environment has and the wheel's must not.
TEST_ONLY = ("moto", "pytest", "hypothesis")


@pytest.fixture(scope="module")
def wheel_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a fresh venv with the built wheel and its runtime dependencies only."""
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=INSTALL_TIMEOUT,
    )
    (wheel,) = dist.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    venv.create(root / "venv", with_pip=True)
    python = root / "venv" / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(wheel)],
        check=True,
        capture_output=True,
        timeout=INSTALL_TIMEOUT,
    )
    return python


def installed(python: Path) -> dict[str, str]:
    """Distribution names of *python*'s environment, and where the package comes from."""
    code = (
        "import importlib.metadata as m, json, celery_sqs_heartbeat as p;"
        "print(json.dumps({'dists': sorted(d.metadata['Name'].lower() for d in m.distributions()),"
        "'file': p.__file__}))"
    )
    out = subprocess.run(
        [str(python), "-c", code], cwd=SUPPORT, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize("heartbeat", [True, False])
def test_the_installed_wheel_runs_a_long_task_once(
    scenario: Scenario, wheel_python: Path, heartbeat: bool
) -> None:
    """Two workers from the wheel's venv; a task 3x the queue's timeout runs once with the
    setting on, and twice with it off (the twin)."""
    found = installed(wheel_python)
    assert Path(found["file"]).is_relative_to(wheel_python.parent.parent), found["file"]
    assert not [d for d in found["dists"] if d.startswith(TEST_ONLY)], found["dists"]

    conf = scenario.config(
        queue_timeout=QUEUE_TIMEOUT, heartbeat=heartbeat, interval=INTERVAL, visibility=VISIBILITY
    )
    workers = [
        # Only the tests' app on the path: the package comes from the wheel's venv.
        scenario.worker(conf, start=False, env={"PYTHONPATH": str(SUPPORT)})
        for _ in range(2)
    ]
    for worker in workers:
        worker.argv[0] = str(wheel_python)
        worker.start()
    for worker in workers:
        worker.wait_ready(60)
    task_id = scenario.send(conf, "sleep", TASK_SECONDS)

    if heartbeat:
        runs = scenario.wait_settled(timeout=TASK_SECONDS + 30)
        starts = [r for r in runs if r.event == "start" and r.task_id == task_id]
        assert len(starts) == 1, f"ran {len(starts)} times: {starts}"
        beats = beats_for(scenario, starts[0].receipt_handle, VISIBILITY)
        assert len(beats) >= TASK_SECONDS / INTERVAL / 2, beats
    else:
        assert len(scenario.wait_starts(task_id, 2, timeout=TASK_SECONDS + 20)) >= 2
        assert not scenario.beats()
