"""The docs match the code: the settings table, and the list of every log line."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import celery_sqs_heartbeat
from celery_sqs_heartbeat import SETTINGS

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "celery_sqs_heartbeat"
#: The page whose table lists every line the package logs.
LOG_PAGE = ROOT / "docs" / "troubleshooting.md"
LOG_HEADING = "## Every log line"


def settings_table(path: Path) -> dict[str, tuple[str, str, str]]:
    rows = {}
    for line in path.read_text().splitlines():
        if line.startswith("| `sqs_heartbeat_"):
            name, type_, default, meaning = (c.strip() for c in line.strip("|").split("|"))
            rows[name.strip("`")] = (type_, default.strip("`"), meaning)
    return rows


def test_settings_table_matches_the_code() -> None:
    expected = {s.name: (s.type, repr(s.default), s.meaning) for s in SETTINGS}
    assert settings_table(ROOT / "docs" / "configuration.md") == expected


def test_the_settings_table_is_written_once() -> None:
    """Every other page links to the configuration reference instead of copying it."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    copies = [p.name for p in pages if settings_table(p)]
    assert copies == ["configuration.md"]


def test_public_api() -> None:
    for name in celery_sqs_heartbeat.__all__:
        assert getattr(celery_sqs_heartbeat, name) is not None
    assert (PACKAGE / "py.typed").exists()


# -- the log lines ---------------------------------------------------------------------------

#: Logger methods and the level each writes at.
LOGGER_METHODS = {
    "debug": "DEBUG",
    "info": "INFO",
    "warning": "WARNING",
    "error": "ERROR",
    "exception": "ERROR",
    "critical": "CRITICAL",
}
#: Helpers that log a message once: their message is the argument after the level.
ONCE_HELPERS = {"note_once", "_note_once"}
#: Functions whose returned strings the worker logs as they are (``logger.warning("%s",
#: line)``), and at which level.
FORWARDED = {"startup_warnings": "WARNING", "prefetch_warnings": "WARNING"}
#: Rows of a table of log lines: the call that makes one, and the positions of its level
#: and message (``_report.ENDINGS``: ``Ending(lost, level, message)``).
TABLE_ROWS = {"Ending": (1, 2)}
#: A %-style placeholder (``%s``, ``%d``, ``%.2f``, ``%g``, ``%r``, ``%(task)s``...).
PLACEHOLDER = re.compile(r"%(?:\(\w+\))?[-#0 +]*(?:\d+|\*)?(?:\.\d+)?[sdifgeExXrc]")
ELLIPSIS = "…"


def _text(node: ast.expr) -> str | None:
    """The message a literal writes, each value filled in at run time shown as "…";
    None if *node* is not a literal message."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return PLACEHOLDER.sub(ELLIPSIS, node.value).replace("%%", "%")
    if isinstance(node, ast.JoinedStr):
        return "".join(
            v.value if isinstance(v, ast.Constant) else ELLIPSIS
            for v in node.values
            if not isinstance(v, ast.Constant) or isinstance(v.value, str)
        )
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _text(node.left), _text(node.right)
        return (left if left is not None else ELLIPSIS) + (right if right is not None else ELLIPSIS)
    return None


def _level(node: ast.expr) -> str | None:
    """``logging.WARNING`` → "WARNING"; None for a level chosen at run time."""
    if isinstance(node, ast.Attribute) and node.attr in LOGGER_METHODS.values():
        return node.attr
    return None


def _logger_levels(func: ast.expr) -> list[str] | None:
    """The levels a call to *func* logs at, if it is ``logger.<method>`` or a choice
    between two of them (``(logger.error if x else logger.warning)``)."""
    if isinstance(func, ast.IfExp):
        body, orelse = _logger_levels(func.body), _logger_levels(func.orelse)
        return None if body is None or orelse is None else body + orelse
    if (
        isinstance(func, ast.Attribute)
        and isinstance(func.value, ast.Name)
        and "log" in func.value.id.lower()
        and (func.attr in LOGGER_METHODS or func.attr == "log")
    ):
        return [LOGGER_METHODS.get(func.attr, "log")]
    return None


def _messages_of(tree: ast.AST) -> list[tuple[str, str | None]]:
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in FORWARDED:
            for ret in ast.walk(node):
                if isinstance(ret, ast.Return) and isinstance(ret.value, ast.List):
                    for item in ret.value.elts:
                        text = _text(item)
                        if text is not None:
                            found.append((text, FORWARDED[node.name]))
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else None
        name = node.func.id if isinstance(node.func, ast.Name) else name
        levels = _logger_levels(node.func)
        message: ast.expr | None = None
        if levels == ["log"]:  # logger.log(level, message, ...)
            if len(node.args) >= 2:
                levels, message = [_level(node.args[0]) or "log"], node.args[1]
        elif levels is not None:
            message = node.args[0] if node.args else None
        elif name in TABLE_ROWS:
            at_level, at_message = TABLE_ROWS[name]
            if len(node.args) > at_message:
                levels, message = [_level(node.args[at_level]) or "log"], node.args[at_message]
        elif name in ONCE_HELPERS:
            keyword = next((k.value for k in node.keywords if k.arg == "message"), None)
            at = next((i for i, a in enumerate(node.args) if _level(a) is not None), None)
            if keyword is not None:
                message = keyword
            elif at is not None and at + 1 < len(node.args):
                message = node.args[at + 1]
            level = next((k.value for k in node.keywords if k.arg == "level"), None)
            level = level if level is not None else node.args[at] if at is not None else None
            levels = [(_level(level) if level is not None else None) or "log"]
        text = None if message is None else _text(message)
        if text is None or not text.strip(ELLIPSIS + " "):
            continue  # not a literal, or only passes on a message written elsewhere
        for level in levels or ["log"]:
            found.append((text, None if level == "log" else level))
    return found


def logged_messages() -> dict[str, set[str]]:
    """Every message the package's modules log, with the levels it is logged at (an
    empty set: a level chosen at run time)."""
    messages: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for text, level in _messages_of(ast.parse(path.read_text(), str(path))):
            levels = messages.setdefault(text, set())
            if level is not None:
                levels.add(level)
    return messages


def documented_messages() -> dict[str, set[str]]:
    """The first two columns of the table under :data:`LOG_HEADING`: each message as
    the operator sees it (values shown as "…") and its level or levels."""
    lines = LOG_PAGE.read_text().split(LOG_HEADING, 1)[1].split("\n## ", 1)[0].splitlines()
    rows: dict[str, set[str]] = {}
    for line in lines:
        if line.startswith("| `"):
            message, level = (c.strip() for c in line.strip("|").split("|")[:2])
            rows[message.strip("`")] = set(re.findall(r"[A-Z]{4,}", level))
    return rows


def test_the_log_collector_finds_what_it_should() -> None:
    """The collector reads each way the package writes a log line."""
    source = """
logger.warning("late by %.1f s on %s (%d%%)", x, y, z)
(logger.error if bad else logger.warning)("failed (%s)", exc)
logger.log(logging.INFO, "said at %g", 1)
state.note_once("key", logging.WARNING, "slot %s missing", 3)
logger.warning("%s", line)
Ending(True, logging.WARNING, "stopped after %(beats)d beats on %(queue)s")
Ending(lost=False)
self.log("not a logger")
def startup_warnings(app):
    return ["no acks_late: " + ", ".join(names) + ". Set it."]
"""
    assert sorted(_messages_of(ast.parse(source))) == [
        ("failed (…)", "ERROR"),
        ("failed (…)", "WARNING"),
        ("late by … s on … (…%)", "WARNING"),
        ("no acks_late: …. Set it.", "WARNING"),
        ("said at …", "INFO"),
        ("slot … missing", "WARNING"),
        ("stopped after … beats on …", "WARNING"),
    ]


def test_every_log_line_is_documented() -> None:
    logged, documented = logged_messages(), documented_messages()
    assert logged, "no log line found in the package: the collector is broken"
    assert sorted(set(logged) - set(documented)) == [], f"missing from {LOG_PAGE.name}"
    assert sorted(set(documented) - set(logged)) == [], "no longer logged by the code"
    wrong = {
        message: {"documented": documented[message], "logged": levels}
        for message, levels in logged.items()
        if levels and levels != documented[message]  # no levels: chosen at run time
    }
    assert wrong == {}
