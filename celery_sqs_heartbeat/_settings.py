"""The heartbeat's settings: defined, resolved for a task and validated here, once.

Every setting is a Celery setting (``app.conf``) and, but the worker-wide
``sqs_heartbeat_own_process``, under the same name a task option
(``@app.task(sqs_heartbeat_interval=10)`` or ``task_annotations``): Celery turns both
into attributes of the task class, so a task attribute overrides the configuration.
:data:`SETTINGS` is the one definition; the reference table in ``docs/configuration.md``
is checked against it by a test.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from celery.exceptions import ImproperlyConfigured

#: SQS's ceiling for a message's visibility timeout, and for the total time a
#: received message can be kept hidden, counted from its receipt.
MAX_VISIBILITY_SECONDS = 43200


class ConfigurationError(ImproperlyConfigured):  # type: ignore[misc]
    """A heartbeat setting or task option has a value the heartbeat cannot use.

    Raised at worker start, before any task runs, so that a typo stops the worker
    instead of silently letting long tasks run twice.
    """

    def __init__(self, setting: str, value: object, reason: str, task: str | None = None):
        self.setting = setting
        self.value = value
        self.reason = reason
        self.task = task
        where = (
            f"task option {setting}={value!r} of task {task!r}"
            if task
            else (f"setting {setting}={value!r}")
        )
        super().__init__(f"celery-sqs-heartbeat: invalid {where}: {reason}")


def _seconds(value: object) -> float:
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be a number of seconds (int, float or timedelta)")
    if not math.isfinite(value):
        raise ValueError("must be a finite number of seconds")
    return float(value)


def _parse_enabled(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be True or False")
    return value


def _parse_interval(value: object) -> float:
    seconds = _seconds(value)
    if seconds <= 0:
        raise ValueError("must be > 0 seconds")
    return seconds


def _parse_visibility_timeout(value: object) -> int:
    seconds = _seconds(value)
    if seconds != int(seconds):
        raise ValueError("must be a whole number of seconds (SQS takes integers)")
    if not 0 < seconds <= MAX_VISIBILITY_SECONDS:
        raise ValueError(f"must be between 1 and {MAX_VISIBILITY_SECONDS} seconds (SQS's limit)")
    return int(seconds)


def _parse_max_duration(value: object) -> float | None:
    if value is None:
        return None
    seconds = _seconds(value)
    if seconds <= 0:
        raise ValueError("must be > 0 seconds, or None for SQS's 12-hour limit")
    return seconds


@dataclass(frozen=True)
class Setting:
    """One heartbeat setting: its name, default, type and meaning, in one place."""

    name: str
    default: object
    type: str
    meaning: str
    parse: Callable[[object], object]
    #: Worker-wide: read from the Celery configuration only, never from a task.
    worker: bool = False


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "sqs_heartbeat_enabled",
        False,
        "bool",
        "Heartbeat tasks: extend the visibility of the running task's own SQS message.",
        _parse_enabled,
    ),
    Setting(
        "sqs_heartbeat_interval",
        30,
        "seconds (int, float or timedelta)",
        "Time between beats (at most). The first beat comes one interval after the message"
        " is received (up to an eighth of an interval more, on the beats' grid), so a"
        " shorter task makes no SQS call.",
        _parse_interval,
    ),
    Setting(
        "sqs_heartbeat_visibility_timeout",
        120,
        "whole seconds (int or timedelta)",
        "Visibility each beat sets, counted from the beat. Also how soon the message of"
        " a crashed worker is visible again. Must be greater than the interval.",
        _parse_visibility_timeout,
    ),
    Setting(
        "sqs_heartbeat_max_duration",
        None,
        "seconds or None",
        "Stop beating one task after this long, so a stuck task's message is redelivered."
        " None: beat until SQS's 12-hour limit, or, in a prefork worker, until the task's"
        " hard time limit.",
        _parse_max_duration,
    ),
    Setting(
        "sqs_heartbeat_interrupt",
        False,
        "bool",
        "Raise celery_sqs_heartbeat.MessageLost in a task whose message is no longer its"
        " own (receipt handle invalid, max_duration, the 12-hour limit, beats failed), in"
        " every pool. This worker then neither deletes the message nor changes its"
        " visibility: it comes back from current().lost.visible_at.",
        _parse_enabled,
    ),
    Setting(
        "sqs_heartbeat_own_process",
        True,
        "bool (worker-wide)",
        "In the threads, solo, gevent and eventlet pools, send the beats from a small"
        " process of the worker's own that runs no task, so that a task holding the GIL or"
        " a greenlet that never yields cannot starve them. False: from a thread of the"
        " worker's process. (A prefork worker's main process runs no task: it always"
        " beats for its children.)",
        _parse_enabled,
        worker=True,
    ),
)

_BY_NAME: Mapping[str, Setting] = {s.name: s for s in SETTINGS}
#: The settings a task may override.
TASK_SETTINGS = tuple(s for s in SETTINGS if not s.worker)


@dataclass(frozen=True, slots=True)
class HeartbeatOptions:
    """The effective heartbeat settings of one task, validated."""

    enabled: bool
    interval: float
    visibility_timeout: int
    max_duration: float | None
    #: Raise :class:`~._loss.MessageLost` in the task once its message is lost.
    interrupt: bool = False


#: Sentinel: the task class sets no such option (neither ``@app.task`` nor
#: ``task_annotations`` gave it one), so the Celery setting applies.
_MISSING = object()


def raw_value(conf: Any, task: Any | None, name: str) -> tuple[object, bool]:
    """The value of setting *name* for *task*, and whether it came from the task."""
    if task is not None:
        value = getattr(task, name, _MISSING)
        if value is not _MISSING:
            return value, True
    return conf.get(name, _BY_NAME[name].default), False


def resolve(conf: Any, task: Any | None = None) -> HeartbeatOptions:
    """Read and validate the effective options for *task* (or the global ones).

    Raises :class:`ConfigurationError` naming the first bad setting or task option.
    """
    task_name = getattr(task, "name", None) if task is not None else None
    parsed: dict[str, Any] = {}
    raw: dict[str, object] = {}
    origin: dict[str, bool] = {}
    for setting in TASK_SETTINGS:
        value, from_task = raw_value(conf, task, setting.name)
        raw[setting.name] = value
        try:
            parsed[setting.name] = setting.parse(value)
        except ValueError as exc:
            raise ConfigurationError(
                setting.name, value, str(exc), task_name if from_task else None
            ) from None
        origin[setting.name] = from_task
    interval = parsed["sqs_heartbeat_interval"]
    visibility = parsed["sqs_heartbeat_visibility_timeout"]
    if interval >= visibility:
        # Blame whichever of the two the task overrides, else the global one.
        name = (
            "sqs_heartbeat_interval"
            if origin["sqs_heartbeat_interval"] or not origin["sqs_heartbeat_visibility_timeout"]
            else "sqs_heartbeat_visibility_timeout"
        )
        task_named = task_name if origin[name] else None
        raise _pace_error(name, raw[name], interval, visibility, task_named)
    return HeartbeatOptions(
        enabled=parsed["sqs_heartbeat_enabled"],
        interval=interval,
        visibility_timeout=visibility,
        max_duration=parsed["sqs_heartbeat_max_duration"],
        interrupt=parsed["sqs_heartbeat_interrupt"],
    )


#: Settings renamed before the first release: set, they stop the worker (never ignored).
RENAMED = {"sqs_heartbeat_beat_process": "sqs_heartbeat_own_process"}


def heartbeat_process(conf: Any) -> bool:
    """Whether the worker may beat from a heartbeat process (``sqs_heartbeat_own_process``)."""
    name = "sqs_heartbeat_own_process"
    value = conf.get(name, _BY_NAME[name].default)
    try:
        return bool(_parse_enabled(value))
    except ValueError as exc:
        raise ConfigurationError(name, value, str(exc)) from None


def resolve_pace(interval: object, visibility_timeout: object) -> tuple[float, int]:
    """Validate an interval and a window given at run time, as :func:`resolve` does."""
    try:
        seconds = _parse_interval(interval)
    except ValueError as exc:
        raise ConfigurationError("sqs_heartbeat_interval", interval, str(exc)) from None
    try:
        window = _parse_visibility_timeout(visibility_timeout)
    except ValueError as exc:
        raise ConfigurationError(
            "sqs_heartbeat_visibility_timeout", visibility_timeout, str(exc)
        ) from None
    if seconds >= window:
        raise _pace_error("sqs_heartbeat_interval", interval, seconds, window, None)
    return seconds, window


def _pace_error(
    name: str, value: object, interval: float, visibility: int, task: str | None
) -> ConfigurationError:
    return ConfigurationError(
        name,
        value,
        f"sqs_heartbeat_interval ({interval:g} s) must be shorter than "
        f"sqs_heartbeat_visibility_timeout ({visibility} s), or the message's "
        "visibility runs out between two beats",
        task,
    )


# -- every task of an app ----------------------------------------------------------------


#: What every heartbeat setting's name begins with, once lower-cased and without
#: Celery's ``CELERY_`` namespace prefix (Django's ``CELERY_SQS_HEARTBEAT_ENABLED``).
_PREFIX = "sqs_heartbeat"
_NAMESPACE = "celery_"


def _meant(key: str) -> str | None:
    """The heartbeat setting *key* looks like it names (None: it looks like none)."""
    name = key.lower()
    name = name.removeprefix(_NAMESPACE)
    return name if name.startswith(_PREFIX) else None


def _suggest(name: str, known: Collection[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def check_names(app: Any) -> None:
    """Stop on a name that looks like a heartbeat setting or task option but that the
    heartbeat never reads: a typo (``sqs_heartbeat_intervl``), a worker-wide setting
    given to a task, or an upper-case name that Celery does not map to the lower-case
    one for settings it does not know (``SQS_HEARTBEAT_ENABLED`` without the
    ``CELERY`` namespace). Ignored, each would leave long tasks unprotected, unsaid.

    Raises :class:`ConfigurationError` naming the first such name and its value; a
    name in :data:`RENAMED` is told its new one.
    """
    conf = app.conf
    for key in list(conf):
        name = _meant(key)
        if name is None:
            continue
        value = conf.get(key)
        if name in RENAMED:
            raise ConfigurationError(key, value, f"it is named {RENAMED[name]} now")
        if name not in _BY_NAME:
            raise ConfigurationError(key, value, "no such setting" + _suggest(name, _BY_NAME))
        if conf.get(name, _MISSING) != value:
            raise ConfigurationError(
                key, value, f"Celery does not read it under this name: write {name}"
            )
    options = {s.name for s in TASK_SETTINGS}
    for task_name, task in sorted(app.tasks.items()):
        for name in dir(task):
            if not name.startswith(_PREFIX) or name in options:
                continue
            if name in RENAMED:
                reason = (
                    f"it is named {RENAMED[name]} now, worker-wide: set it in the configuration"
                )
            elif name in _BY_NAME:
                reason = "it is worker-wide: set it in the configuration"
            else:
                reason = "no such task option" + _suggest(name, options)
            raise ConfigurationError(name, getattr(task, name), reason, task_name)


def resolve_tasks(app: Any) -> dict[str, HeartbeatOptions]:
    """Validate the global settings and every registered task's options.

    Raises :class:`ConfigurationError` on the first bad one; fills no cache.
    """
    check_names(app)
    resolve(app.conf)
    return {name: resolve(app.conf, task) for name, task in sorted(app.tasks.items())}


def enabled_tasks(found: Mapping[str, HeartbeatOptions]) -> list[str]:
    """The app's own heartbeat-enabled tasks (Celery's built-in ones left out)."""
    return [name for name, o in found.items() if o.enabled and not name.startswith("celery.")]


def shortest_interval(app: Any, found: Mapping[str, HeartbeatOptions]) -> float:
    """The shortest interval of the heartbeat-enabled tasks, else the app's own: the
    heartbeat's SQS calls must time out well within it."""
    enabled = [o.interval for o in found.values() if o.enabled]
    return min(enabled) if enabled else resolve(app.conf).interval


def task_rows(app: Any, found: Mapping[str, HeartbeatOptions]) -> list[dict[str, Any]]:
    """Each of the app's own tasks with its effective options, queue and overrides."""
    rows = []
    for name, o in found.items():
        if name.startswith("celery."):
            continue
        task = app.tasks[name]
        rows.append(
            {
                "task": name,
                "enabled": o.enabled,
                "interval": o.interval,
                "visibility_timeout": o.visibility_timeout,
                "max_duration": o.max_duration,
                "acks_late": bool(task.acks_late),
                "queue": app.amqp.router.route({}, name)["queue"].name,
                "overrides": sorted(
                    s.name for s in TASK_SETTINGS if raw_value(app.conf, task, s.name)[1]
                ),
            }
        )
    return rows


#: Pools in which Celery sees a received message only once the one before it has a place
#: to run: solo runs each task where it is delivered, and gevent and eventlet wait there
#: for a free green thread. kombu delivers a receive's messages one after the other.
INLINE_POOLS = frozenset({"solo", "gevent", "eventlet"})


def prefetch_warnings(app: Any, found: Mapping[str, HeartbeatOptions], pool: str) -> list[str]:
    """What a *pool* worker's prefetch leaves unbeaten: with a multiplier other than 1,
    one receive can bring more messages than the pool can start, and those that wait
    in kombu's hands are not yet Celery's, so no heartbeat knows them."""
    multiplier = app.conf.worker_prefetch_multiplier
    if pool not in INLINE_POOLS or multiplier == 1 or not enabled_tasks(found):
        return []
    return [
        f"celery-sqs-heartbeat: a {pool} worker with worker_prefetch_multiplier="
        f"{multiplier} receives several messages at once, and Celery sees each only when "
        "the pool can start it, so no heartbeat covers them while they wait: one that "
        "waits longer than its queue's visibility timeout is delivered to another worker "
        "and runs twice. Set worker_prefetch_multiplier = 1 for this worker."
    ]


def startup_warnings(app: Any, found: Mapping[str, HeartbeatOptions]) -> list[str]:
    """What in the configuration leaves heartbeat-enabled tasks unprotected."""
    early = [n for n in enabled_tasks(found) if not app.tasks[n].acks_late]
    if not early:
        return []
    return [
        "celery-sqs-heartbeat: these heartbeat-enabled tasks do not use acks_late, so "
        "their message is deleted before they run and nothing can be extended: "
        + ", ".join(early)
        + ". Set task_acks_late = True or acks_late=True on the task."
    ]
