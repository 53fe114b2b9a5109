"""Real ``celery worker`` processes against moto's SQS server on loopback.

Queues here hide a received message for two seconds (kombu's ``visibility_timeout``
transport option, which becomes the queue's ``VisibilityTimeout``), so a task of six
seconds outlives it three times over. Each "exactly once" test has a twin with the
heartbeat off that shows the duplicate the heartbeat prevents.
"""

from __future__ import annotations

import ast
import itertools
import statistics
import time
from pathlib import Path

import pytest

from celery_sqs_heartbeat.testing import wait_for

from ..conftest import KOMBU_WAIT_SECONDS, RECEIVE_SLACK, SUPPORT, Scenario

pytestmark = pytest.mark.timeout(120)

QUEUE_TIMEOUT = 2
TASK_SECONDS = 3 * QUEUE_TIMEOUT
INTERVAL = 0.5
VISIBILITY = 2


def beats_for(scenario: Scenario, receipt_handle: str | None, visibility: int) -> list[float]:
    """Arrival times of the heartbeat's own visibility changes for one message."""
    assert receipt_handle
    return [
        r.at
        for r in scenario.sqs.visibility_changes([receipt_handle])
        if r.status == 200 and timeouts(r) == {visibility}
    ]


def timeouts(request: object) -> set[int]:
    params = request.params  # type: ignore[attr-defined]
    if "Entries" in params:
        return {int(e["VisibilityTimeout"]) for e in params["Entries"]}
    return {int(params["VisibilityTimeout"])}


#: Each pool with each kind of task. In the green pools a task that never yields starves
#: every other greenlet, the heartbeat's too: see test_green_pools_warn_that_... below.
POOL_TASKS = [
    *((pool, task) for pool in ("prefork", "threads", "solo") for task in ("sleep", "spin")),
    ("gevent", "sleep"),
    ("eventlet", "sleep"),
]


@pytest.mark.parametrize(("pool", "task"), POOL_TASKS)
def test_long_task_runs_exactly_once_with_heartbeat(
    scenario: Scenario, pool: str, task: str
) -> None:
    """Two competing workers; a task 3x the queue's timeout runs once, kept by beats."""
    conf = scenario.config(
        queue_timeout=QUEUE_TIMEOUT, heartbeat=True, interval=INTERVAL, visibility=VISIBILITY
    )
    scenario.start_workers(conf, 2, pool=pool)
    task_id = scenario.send(conf, task, TASK_SECONDS)

    runs = scenario.wait_settled(timeout=TASK_SECONDS + 30)

    starts = [r for r in runs if r.event == "start" and r.task_id == task_id]
    assert len(starts) == 1, f"ran {len(starts)} times: {starts}"
    beats = beats_for(scenario, starts[0].receipt_handle, VISIBILITY)
    # One beat per interval after the first: ~11 for 6 s; a few may share a request.
    assert len(beats) >= TASK_SECONDS / INTERVAL / 2, beats
    assert not [r for r in scenario.beats() if r.status != 200]


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo", "gevent", "eventlet"])
def test_long_task_runs_twice_without_heartbeat(scenario: Scenario, pool: str) -> None:
    """The twin: the same task and workers with the heartbeat off run it twice."""
    conf = scenario.config(queue_timeout=QUEUE_TIMEOUT, heartbeat=False)
    scenario.start_workers(conf, 2, pool=pool)
    task_id = scenario.send(conf, "sleep", TASK_SECONDS)

    starts = scenario.wait_starts(task_id, 2, timeout=TASK_SECONDS + 20)

    assert len(starts) >= 2
    assert not scenario.beats(), "no heartbeat was configured, yet visibility changed"


@pytest.mark.parametrize("pool", ["gevent", "eventlet"])
@pytest.mark.parametrize(("heartbeat_process", "runs"), [(True, 1), (False, 2)])
def test_a_green_task_that_never_yields(
    scenario: Scenario, pool: str, heartbeat_process: bool, runs: int
) -> None:
    """A green task spins on the CPU for three windows and never yields. The beats come
    from the worker's heartbeat process, which the task cannot hold up: it runs once. The
    twin, the heartbeat process off: the heartbeat is a greenlet the task never lets run, the
    message is delivered again, and the worker said so when it started."""
    conf = scenario.config(
        queue_timeout=QUEUE_TIMEOUT,
        heartbeat=True,
        interval=INTERVAL,
        visibility=VISIBILITY,
        sqs_heartbeat_own_process=heartbeat_process,
    )
    workers = scenario.start_workers(conf, 2, pool=pool)
    task_id = scenario.send(conf, "spin", 3 * VISIBILITY)

    found = scenario.wait_settled(timeout=60)

    assert len([r for r in found if r.event == "start" and r.task_id == task_id]) == runs
    for worker in workers:
        assert len(worker.log_lines("never yields")) == (not heartbeat_process), worker.log()


def test_setting_alone_turns_heartbeat_on_without_importing_the_package(
    scenario: Scenario,
) -> None:
    """Zero-code install: the tasks module does not import us (only a few task bodies do,
    when they run, to use the manual API); the setting is enough."""
    tree = ast.parse((SUPPORT / "worker_app.py").read_text())
    top = tree.body
    imported = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in top if isinstance(n, ast.ImportFrom)}
    assert not [m for m in imported if m.startswith("celery_sqs_heartbeat")]

    conf = scenario.config(queue_timeout=10, heartbeat=True, interval=0.3, visibility=2)
    scenario.start_workers(conf, 1)
    task_id = scenario.send(conf, "sleep", 1.5)
    runs = scenario.wait_settled(timeout=30)

    start = next(r for r in runs if r.task_id == task_id and r.event == "start")
    assert len(beats_for(scenario, start.receipt_handle, 2)) >= 2


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def test_task_options_and_annotations(scenario: Scenario) -> None:
    """@app.task options and task_annotations opt tasks out and in, and set intervals."""
    conf = scenario.config(
        queue_timeout=30,
        heartbeat=True,
        interval=1.0,
        visibility=3,
        task_annotations={
            "worker_app.sleep": {"sqs_heartbeat_interval": 0.3},
            "worker_app.plain": {"sqs_heartbeat_enabled": False},
        },
    )
    scenario.start_workers(conf, 1, pool="threads", concurrency=4)
    ids = {
        name: scenario.send(conf, name, 3.2) for name in ("sleep", "plain", "opted_out", "opted_in")
    }
    runs = scenario.wait_settled(timeout=40)
    handle = {r.task_id: r.receipt_handle for r in runs if r.event == "start"}

    short = beats_for(scenario, handle[ids["sleep"]], 3)
    default = beats_for(scenario, handle[ids["opted_in"]], 3)
    assert beats_for(scenario, handle[ids["plain"]], 3) == []  # annotation opted out
    assert beats_for(scenario, handle[ids["opted_out"]], 3) == []  # task option opted out
    assert len(short) >= 6 and 0.2 <= statistics.median(_gaps(short)) <= 0.45, _gaps(short)
    # A beat not yet due may ride along in a request to its queue when it is due within
    # half its interval, so the 1 s task's beats come 0.5 to 1 s apart.
    assert 2 <= len(default) <= 6, default
    assert all(0.45 <= gap <= 1.3 for gap in _gaps(default)), _gaps(default)


def test_opt_in_when_the_setting_is_off(scenario: Scenario) -> None:
    """With the global setting off, a task option or an annotation turns it on."""
    conf = scenario.config(
        queue_timeout=30,
        heartbeat=False,
        interval=0.4,
        visibility=3,
        task_annotations={"worker_app.plain": {"sqs_heartbeat_enabled": True}},
    )
    scenario.start_workers(conf, 1, pool="threads", concurrency=3)
    ids = {name: scenario.send(conf, name, 1.5) for name in ("sleep", "plain", "opted_in")}
    runs = scenario.wait_settled(timeout=30)
    handle = {r.task_id: r.receipt_handle for r in runs if r.event == "start"}

    assert beats_for(scenario, handle[ids["sleep"]], 3) == []
    assert len(beats_for(scenario, handle[ids["plain"]], 3)) >= 2
    assert len(beats_for(scenario, handle[ids["opted_in"]], 3)) >= 2


@pytest.mark.needs_request_log("the shape of each request, to count entries per batch")
def test_concurrent_tasks_share_batched_beats(scenario: Scenario) -> None:
    """Beats of one process's tasks that fall due together go in one batch request."""
    conf = scenario.config(queue_timeout=30, heartbeat=True, interval=0.5, visibility=3)
    scenario.start_workers(conf, 1, pool="threads", concurrency=6)
    for _ in range(6):
        scenario.send(conf, "sleep", 2.5)
    runs = scenario.wait_settled(timeout=40)

    assert len([r for r in runs if r.event == "start"]) == 6
    beats = scenario.beats()
    entries = sum(len(r.receipt_handles) for r in beats)
    batches = [r for r in beats if r.action == "ChangeMessageVisibilityBatch"]
    assert batches and max(len(r.receipt_handles) for r in batches) >= 3
    assert len(beats) * 2 <= entries, (len(beats), entries)
    assert all(r.status == 200 for r in beats)


@pytest.mark.needs_request_log("kombu's DeleteMessage and requeue requests, to order beats")
@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_heartbeat_stops_however_the_task_ends(scenario: Scenario, pool: str) -> None:
    """After a task ends (fail, retry, Reject(requeue=True), Ignore, hard time limit), no
    beat follows kombu's delete or requeue of its message, and none sets visibility 0."""
    visibility = 3
    conf = scenario.config(queue_timeout=30, heartbeat=True, interval=0.3, visibility=visibility)
    scenario.start_workers(conf, 1, pool=pool, concurrency=4)
    ids = [scenario.send(conf, name, 1.2) for name in ("fail", "retry_once", "reject_once")]
    ids.append(scenario.send(conf, "ignore", 1.2))
    expected = [ids[0], ids[1], ids[1], ids[2], ids[2], ids[3]]
    if pool == "prefork":  # a hard time limit kills the pool child: prefork only
        ids.append(scenario.send(conf, "sleep", 30, time_limit=1.2))
        expected.append(ids[-1])
    wait_for(lambda: len(scenario.starts()) == len(expected), timeout=30, what="every run to start")
    wait_for(lambda: scenario.queue_counts() == (0, 0), timeout=60, what="an empty queue")

    starts = scenario.starts()
    assert sorted(r.task_id for r in starts) == sorted(expected)
    for run in starts:
        rh = run.receipt_handle
        changes = scenario.sqs.visibility_changes([rh])
        ours = beats_for(scenario, rh, visibility)
        assert ours, f"no beat for {run}"
        assert all(0 not in timeouts(r) for r in changes)
        deletes = [
            r.at for r in scenario.requests("DeleteMessage") if r.params.get("ReceiptHandle") == rh
        ]
        requeues = [r.at for r in changes if timeouts(r) == {KOMBU_WAIT_SECONDS}]
        ended = deletes + requeues
        assert len(ended) == 1, (run, deletes, requeues)
        assert max(ours) < ended[0], f"a beat followed the delete/requeue of {run}"


@pytest.mark.parametrize("heartbeat", [True, False])
def test_killed_worker_message_returns_within_one_window(
    scenario: Scenario, heartbeat: bool
) -> None:
    """SIGKILL the whole worker mid-task: with the heartbeat its message is visible again
    within the heartbeat's window, though the queue's own timeout is 30 s; without it,
    it stays hidden."""
    interval, visibility = 0.5, 2
    conf = scenario.config(
        queue_timeout=30, heartbeat=heartbeat, interval=interval, visibility=visibility
    )
    (first,) = scenario.start_workers(conf, 1)
    task_id = scenario.send(conf, "sleep", 60)
    scenario.wait_starts(task_id, 1, timeout=20)
    if heartbeat:
        wait_for(lambda: len(scenario.beats()) >= 2, timeout=10, what="two beats")
    (second,) = scenario.start_workers(conf, 1)

    first.kill()
    killed_at = time.time()
    bound = visibility + interval + RECEIVE_SLACK

    if heartbeat:
        starts = scenario.wait_starts(task_id, 2, timeout=bound + 10)
        assert starts[1].worker == second.name
        assert starts[1].at - killed_at <= bound, starts[1].at - killed_at
    else:
        with pytest.raises(TimeoutError):
            scenario.wait_starts(task_id, 2, timeout=bound + 1)


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"sqs_heartbeat_interval": -1}, ["sqs_heartbeat_interval=-1"]),
        ({"sqs_heartbeat_enabled": "yes"}, ["sqs_heartbeat_enabled='yes'"]),
        (
            {"task_annotations": {"worker_app.sleep": {"sqs_heartbeat_visibility_timeout": 1.5}}},
            ["sqs_heartbeat_visibility_timeout=1.5", "worker_app.sleep"],
        ),
        (
            {"task_annotations": {"worker_app.plain": {"sqs_heartbeat_interval": 5}}},
            ["sqs_heartbeat_interval=5", "worker_app.plain", "shorter than"],
        ),
        (
            {"sqs_heartbeat_intervl": 5},
            ["sqs_heartbeat_intervl=5", "did you mean sqs_heartbeat_interval?"],
        ),
        (
            {"task_annotations": {"worker_app.sleep": {"sqs_heartbeat_own_process": False}}},
            ["sqs_heartbeat_own_process=False", "worker_app.sleep", "worker-wide"],
        ),
    ],
)
def test_bad_setting_stops_the_worker(
    scenario: Scenario, extra: dict[str, object], named: list[str]
) -> None:
    """A bad setting or task option: `celery worker` exits non-zero and names it."""
    conf = scenario.config(queue_timeout=10, heartbeat=True, interval=1, visibility=3, **extra)
    worker = scenario.worker(conf)
    status = worker.wait(timeout=60)
    assert status != 0
    log = worker.log()
    for text in named:
        assert text in log, log
    assert " ready." not in log


def test_non_sqs_broker_runs_tasks_quietly(scenario: Scenario, tmp_path: Path) -> None:
    """A filesystem:// broker: tasks run, and nothing about the heartbeat above info."""
    folder = tmp_path / "broker"
    folder.mkdir()
    transport = {
        "data_folder_in": str(folder),
        "data_folder_out": str(folder),
        "control_folder": str(tmp_path / "control"),
    }
    conf = {
        "task_default_queue": scenario.queue,
        "sqs_heartbeat_enabled": True,
        "sqs_heartbeat_interval": 0.2,
        "sqs_heartbeat_visibility_timeout": 2,
        "broker_transport_options": transport,
    }
    worker = scenario.worker(conf, broker_url="filesystem://", start=False)
    worker.start().wait_ready(60)
    from celery import Celery

    sender = Celery("sender", broker="filesystem://")
    sender.conf.update(conf)
    task_id = sender.send_task("worker_app.sleep", args=[1.0], queue=scenario.queue).id
    wait_for(
        lambda: [r for r in scenario.runs(task_id) if r.event == "end"],
        timeout=30,
        what="the task to end",
    )

    lines = [ln for ln in worker.log().splitlines() if "heartbeat" in ln.lower()]
    assert not [
        ln for ln in lines if any(f"{lvl}/" in ln for lvl in ("WARNING", "ERROR", "CRITICAL"))
    ]
    assert len([ln for ln in lines if "INFO/" in ln]) <= 1


def test_cli_lists_effective_settings(scenario: Scenario) -> None:
    """`celery -A app sqs-heartbeat` prints every task's effective settings."""
    import json
    import subprocess
    import sys

    conf = scenario.config(
        queue_timeout=10,
        heartbeat=True,
        interval=2,
        visibility=10,
        task_annotations={"worker_app.plain": {"sqs_heartbeat_interval": 0.5}},
    )
    worker = scenario.worker(conf, start=False)
    cmd = [sys.executable, "-m", "celery", "-A", "worker_app", "sqs-heartbeat"]
    table = subprocess.run(
        cmd, env=worker.env, cwd=SUPPORT, capture_output=True, text=True, timeout=60
    )
    assert table.returncode == 0, table.stderr
    assert "worker_app.plain" in table.stdout and "0.5" in table.stdout
    as_json = subprocess.run(
        [*cmd, "--json"], env=worker.env, cwd=SUPPORT, capture_output=True, text=True, timeout=60
    )
    rows = {r["task"]: r for r in json.loads(as_json.stdout)}
    assert rows["worker_app.plain"]["interval"] == 0.5
    assert rows["worker_app.plain"]["overrides"] == ["sqs_heartbeat_interval"]
    assert rows["worker_app.opted_out"]["enabled"] is False
    assert rows["worker_app.sleep"]["visibility_timeout"] == 10


@pytest.mark.parametrize(
    ("pool", "heartbeat_process", "runs"),
    [
        ("prefork", True, 1),
        ("threads", True, 1),
        ("solo", True, 1),
        ("threads", False, 2),
        ("solo", False, 2),
    ],
)
def test_a_task_stuck_in_a_c_call(
    scenario: Scenario, pool: str, heartbeat_process: bool, runs: int
) -> None:
    """A task keeps its process's GIL in one C call for 11 s; window 4 s, interval 1 s.

    In prefork the worker's main process beats for it, and in the threads and solo
    pools the worker's heartbeat process: it runs once. The twins: with the heartbeat process off
    the heartbeat shares the task's process and cannot beat, and a second worker runs
    the task again.
    """
    conf = scenario.config(
        queue_timeout=4,
        heartbeat=True,
        interval=1,
        visibility=4,
        sqs_heartbeat_own_process=heartbeat_process,
    )
    scenario.start_workers(conf, 2, pool=pool)
    task_id = scenario.send(conf, "hold_gil", 11)

    found = scenario.wait_settled(timeout=60)

    assert len([r for r in found if r.event == "start" and r.task_id == task_id]) == runs
