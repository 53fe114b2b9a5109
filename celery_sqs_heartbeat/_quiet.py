"""Keeping the heartbeat's own SQS calls out of users' traces.

OpenTelemetry's botocore instrumentation patches ``BaseClient._make_api_call`` for the
whole process, so every beat would become a span: a root span with no trace, since the
heartbeat's threads run outside any (up to 120 of them per task-hour at the default
interval). :func:`quiet` wraps each call the heartbeat makes in OpenTelemetry's own
suppression, the context keys every OpenTelemetry instrumentation checks before it makes
a span: ``suppress_instrumentation`` (botocore's, and all others') and
``suppress_http_instrumentation`` (urllib3's, the HTTP library under botocore, which
would otherwise record the request of a suppressed botocore call).

A call made inside a span, which only a task's own ``extend()`` can be (the heartbeat's
threads never carry one), is left alone: it is the task's work, on the task's time, and
shows in the task's trace as a child span like any other SQS call the task makes (as
Sentry's boto3 integration, which only makes spans inside a transaction, shows it too).

Datadog's ``ddtrace`` patches the same method, and its only switches are app-wide. It
looks for its per-object settings (a "pin") on the client before each call, and traces
nothing for an object whose pin is None: :func:`untraced` gives the heartbeat's own
clients that, and leaves every other client and the user's tracer as they are. A
ddtrace that stops reading it only brings the spans back (``tests/unit/test_ddtrace.py``
tells).

OpenTelemetry is never imported here: it is used only when something else in the
process already imported ``opentelemetry.instrumentation.utils``, as every
OpenTelemetry instrumentation does. Without it, a call costs one dictionary look-up.
Nothing here raises: any surprise from OpenTelemetry means "do not suppress".
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

__all__ = ["quiet", "quietly", "untraced"]

P = ParamSpec("P")
R = TypeVar("R")

logger = logging.getLogger("celery_sqs_heartbeat")

#: The module that holds OpenTelemetry's public suppression helpers
#: (opentelemetry-instrumentation); every instrumentation imports it.
OTEL_UTILS = "opentelemetry.instrumentation.utils"

_NOTHING: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
#: The attribute ddtrace reads its pin from, on an object it traces (``ddtrace._trace.pin``).
DDTRACE_PIN = "_datadog_pin"

#: OpenTelemetry's helpers once found: (the suppressions to enter, "in a span now?").
_otel: tuple[tuple[Callable[[], Any], ...], Callable[[], bool]] | None = None


def quiet() -> contextlib.AbstractContextManager[Any]:
    """A context manager in which the heartbeat's SQS calls make no OpenTelemetry span.

    Used around each call the heartbeat sends to SQS. A no-op where OpenTelemetry is
    not loaded, and inside a span (a task's own ``extend()`` under its task's span).
    """
    otel = _otel or _find()
    if otel is None:
        return _NOTHING
    suppressions, in_span = otel
    stack = contextlib.ExitStack()
    try:
        if in_span():
            return _NOTHING
        for suppress in suppressions:
            stack.enter_context(suppress())
    except Exception:
        stack.close()  # leaves no half-entered suppression attached to this thread
        logger.debug("celery-sqs-heartbeat: OpenTelemetry's suppression failed", exc_info=True)
        return _NOTHING
    return stack


def untraced(client: R) -> R:
    """*client* (one of the heartbeat's own boto3 clients), for which ddtrace makes no
    span, whether ddtrace is loaded now, later, or never."""
    with contextlib.suppress(Exception):  # a client that takes no attribute: traced
        setattr(client, DDTRACE_PIN, None)
    return client


def quietly(func: Callable[P, R]) -> Callable[P, R]:
    """Decorate *func* (a function that makes SQS calls) to run it in :func:`quiet`."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with quiet():
            return func(*args, **kwargs)

    return wrapper


def _find() -> tuple[tuple[Callable[[], Any], ...], Callable[[], bool]] | None:
    """OpenTelemetry's helpers, if an instrumentation has loaded them; looked up until
    found (an instrumentation may be switched on after the worker starts), then kept."""
    global _otel
    utils = sys.modules.get(OTEL_UTILS)
    if utils is None:
        return None
    try:
        trace = sys.modules["opentelemetry.trace"]
        suppressions = tuple(
            helper
            for helper in (
                getattr(utils, "suppress_instrumentation", None),
                # Newer than the other: where it is missing, it is simply not entered.
                getattr(utils, "suppress_http_instrumentation", None),
            )
            if helper is not None
        )

        def in_span() -> bool:
            return bool(trace.get_current_span().get_span_context().is_valid)

    except Exception:
        logger.debug("celery-sqs-heartbeat: OpenTelemetry not usable", exc_info=True)
        return None
    _otel = (suppressions, in_span)
    return _otel
