"""The ``celery sqs-heartbeat`` command: the effective settings, and the preflight check.

It reads the app's configuration itself and imports no signal handler: ``_plugin``, the
package's entry point, installs those.
"""

from __future__ import annotations

import json
from typing import Any

import click
from celery.bin.base import handle_preload_options

from ._settings import ConfigurationError, resolve_tasks, startup_warnings, task_rows

_COLUMNS = ("task", "enabled", "interval", "visibility_timeout", "max_duration", "acks_late")


def _table(rows: list[dict[str, Any]], columns: tuple[str, ...] = _COLUMNS) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float):
            return f"{value:g}"
        return str(value)

    cells = [list(columns)] + [[cell(r[c]) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


# A group, so that further subcommands (a preflight check) can join it.
@click.group(name="sqs-heartbeat", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
@handle_preload_options  # type: ignore[untyped-decorator]
def sqs_heartbeat(ctx: click.Context, as_json: bool, **_: Any) -> None:
    """Show the effective SQS heartbeat settings of every registered task.

    Reads the app's configuration and task options only; sends nothing to SQS.
    """
    if ctx.invoked_subcommand is not None:
        return
    app = ctx.obj.app
    try:
        found = resolve_tasks(app)
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None
    rows = task_rows(app, found)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(_table(rows))
    for line in startup_warnings(app, found):
        click.echo(f"warning: {line}", err=True)
    if not any(r["enabled"] for r in rows):
        click.echo("No task has the heartbeat enabled (sqs_heartbeat_enabled).", err=True)


@sqs_heartbeat.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.pass_context
def check_command(ctx: click.Context, as_json: bool) -> None:
    """Preflight: will the heartbeat work against the real broker?

    Checks the settings, each queue the heartbeat-enabled tasks route to (its visibility
    timeout against the first beat, redrive policy, FIFO) and the permission to change
    visibility, with a probe that cannot touch any message. Exits 1 on any problem.
    """
    from ._check import check

    report = check(ctx.obj.app)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        for key, value in report.broker.items():
            click.echo(f"broker {key}: {value}")
        if report.tasks:
            click.echo()
            click.echo(_table(report.tasks, (*_COLUMNS, "queue")))
        if report.queues:
            click.echo()
            queue_rows = [
                {
                    "queue": q.name,
                    "exists": q.exists,
                    "visibility_timeout": q.visibility_timeout,
                    "first_beat": q.first_beat,
                    "max_receive_count": q.max_receive_count,
                    "fifo": q.fifo,
                    "permission": q.permission,
                }
                for q in report.queues
            ]
            click.echo(_table(queue_rows, tuple(queue_rows[0])))
        click.echo()
        for key, value in report.worker.items():
            click.echo(f"{key}: {value}")
        for note in report.notes:
            click.echo(f"note: {note}")
        for problem in report.problems:
            click.echo(f"PROBLEM: {problem}", err=True)
        click.echo("OK" if not report.problems else f"{len(report.problems)} problem(s)")
    ctx.exit(1 if report.problems else 0)
