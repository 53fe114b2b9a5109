"""The compatibility matrix: every supported Python with every supported Celery series.

``make matrix`` runs it and prints the table (``python noxfile.py --table REPORT``).
Each cell is a virtual environment with the latest patch release of one Celery series
and the kombu series of the same number (Celery 5.4.0 would otherwise take any kombu
5.x), and runs:

* the unit tests;
* one exactly-once test and its heartbeat-off twin, each in a prefork and a threads
  worker, against moto's server (or ``SQS_TEST_ENDPOINT``);
* with Python 3.11, the shutdown tests (warm, cold, soft, the drain): each recipe of
  the Deploying page, as written for the series (``tests/integration/test_lifecycle_integration.py``
  and ``tests/integration/test_drain_integration.py``).

Interpreters are found on ``PATH`` (the Makefile adds pyenv's versions); a missing one
is a skipped cell, and the table says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nox

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
#: Celery series; each cell pins celery and kombu to the same series.
CELERY = ["5.4", "5.5", "5.6", "5.7"]
#: Where each cell writes the versions it really installed, beside nox's report.
RESULTS = Path("matrix-results")
INTEGRATION = "tests/integration/test_worker_integration.py"
#: The exactly-once test and its twin, each with a prefork and a threads worker.
EXACTLY_ONCE = [
    f"{INTEGRATION}::test_long_task_runs_exactly_once_with_heartbeat[prefork-sleep]",
    f"{INTEGRATION}::test_long_task_runs_exactly_once_with_heartbeat[threads-sleep]",
    f"{INTEGRATION}::test_long_task_runs_twice_without_heartbeat[prefork]",
    f"{INTEGRATION}::test_long_task_runs_twice_without_heartbeat[threads]",
]
#: The shutdown recipes and the drain, which read Celery's internals of each series.
SHUTDOWNS = [
    "tests/integration/test_lifecycle_integration.py",
    "tests/integration/test_drain_integration.py",
]
#: They depend on the Celery series, not on Python: one Python runs them.
SHUTDOWN_PYTHON = "3.11"
VERSIONS = (
    "import json, platform, celery, kombu, botocore;"
    "print(json.dumps({'python': platform.python_version(), 'celery': celery.__version__,"
    "'kombu': kombu.__version__, 'botocore': botocore.__version__}))"
)

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["compat"]


@nox.session(python=PYTHONS)
@nox.parametrize("celery", CELERY)
def compat(session: nox.Session, celery: str) -> None:
    """One cell: the unit tests and the exactly-once pair with one Python and one Celery."""
    session.install(f"celery[sqs]=={celery}.*", f"kombu[sqs]=={celery}.*", "-e", ".[test]")
    versions = session.run("python", "-c", VERSIONS, silent=True)
    if versions:  # None with --install-only
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{session.name}.json").write_text(str(versions).strip())
    session.run("python", "-m", "pytest", "-m", "not integration", "-q", "-p", "no:cacheprovider")
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *EXACTLY_ONCE)
    if session.python == SHUTDOWN_PYTHON:
        session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *SHUTDOWNS)


def table(reports: list[Path]) -> str:
    """Markdown: one row per Python, one column per Celery series, the result in each
    (from one or more nox reports, as when cells were run one at a time)."""
    results = {
        # nox's report names a session by its function; its first signature is the cell.
        s["signatures"][0]: s["result"]
        for report in reports
        for s in json.loads(report.read_text())["sessions"]
    }
    lines = [
        "| Python | " + " | ".join(f"Celery {c}" for c in CELERY) + " |",
        "|---" * (len(CELERY) + 1) + "|",
    ]
    for python in PYTHONS:
        cells = []
        for celery in CELERY:
            name = f"compat-{python}(celery='{celery}')"
            result = results.get(name, "not run")
            installed = RESULTS / f"{name}.json"
            if installed.exists() and result != "skipped":
                v = json.loads(installed.read_text())
                result += f" ({v['python']}, celery {v['celery']}, kombu {v['kombu']})"
            cells.append(result)
        lines.append(f"| {python} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Print the matrix of a nox --report file.")
    parser.add_argument("--table", type=Path, nargs="+", required=True, help="nox's reports")
    sys.stdout.write(table(parser.parse_args().table) + "\n")
