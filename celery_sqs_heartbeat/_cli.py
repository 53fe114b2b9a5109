"""The ``celery sqs-heartbeat`` command, and the hook that installs the heartbeat.

This module is the package's ``celery.commands`` entry point. The ``celery`` program
imports every such entry point when it starts, so importing this module is what
installs the heartbeat for workers started with ``celery worker`` without any user
module importing the package.
"""

from __future__ import annotations

import json
from typing import Any

import click
from celery.bin.base import handle_preload_options

from . import _worker
from ._settings import SETTINGS, ConfigurationError, raw_value

_worker.connect(None)

_COLUMNS = ("task", "enabled", "interval", "visibility_timeout", "max_duration", "acks_late")


def _rows(app: Any) -> list[dict[str, Any]]:
    options = _worker.check_app(app)
    return [
        {
            "task": name,
            "enabled": o.enabled,
            "interval": o.interval,
            "visibility_timeout": o.visibility_timeout,
            "max_duration": o.max_duration,
            "acks_late": bool(app.tasks[name].acks_late),
            "overrides": sorted(
                s.name for s in SETTINGS if raw_value(app.conf, app.tasks[name], s.name)[1]
            ),
        }
        for name, o in options.items()
        if not name.startswith("celery.")
    ]


def _table(rows: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float):
            return f"{value:g}"
        return str(value)

    cells = [list(_COLUMNS)] + [[cell(r[c]) for c in _COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(_COLUMNS))]
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
        rows = _rows(app)
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(_table(rows))
    for line in _worker.startup_warnings(app, _worker.check_app(app)):
        click.echo(f"warning: {line}", err=True)
    if not any(r["enabled"] for r in rows):
        click.echo("No task has the heartbeat enabled (sqs_heartbeat_enabled).", err=True)
