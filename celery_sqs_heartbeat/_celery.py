"""Every read of Celery's and kombu's objects: the request, the message, the pool, the
consumer and what waits in them.

Celery gives a signal's receivers its private objects, and the drain reads the queues
of its pools. Each such read is here, checked against the sources of every supported
series (5.4 to 5.7): when Celery or kombu changes, this is the one file to read again
(the upgrade table of ``docs/deploying.md``). Any surprise means "none", never an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from queue import Empty
from typing import Any

from ._guard import note_once
from ._heartbeat import Heartbeat
from ._settings import ConfigurationError, HeartbeatOptions, resolve

logger = logging.getLogger("celery_sqs_heartbeat")

#: Options used for a task whose options could not be read: no heartbeat.
DISABLED = HeartbeatOptions(enabled=False, interval=30, visibility_timeout=120, max_duration=None)
#: The key under which the main process gives a prefork child a message's receipt time,
#: in the copy of the message's properties that Celery's request carries to the child
#: (``task.request.properties[RECEIVED]`` there): SQS's 12-hour limit counts from it,
#: and the child's own extensions must respect it. Properties are not sent on with a
#: retry, a replace or a result, and kombu's own dict is left as it is.
RECEIVED = "sqs_heartbeat_received"
#: The Celery series from which the threads pool cancels its queued work at shutdown
#: (``TaskPool.on_stop``: ``executor.shutdown(cancel_futures=True)``).
THREADS_CANCEL_QUEUED = (5, 7)
#: The names of the consumer's methods an ETA or countdown timer entry calls.
ETA_CALLBACKS = frozenset({"apply_eta_task", "_limit_post_eta"})
#: The kombu ``Message`` methods that Celery defers as a task's ack or reject.
SETTLES = frozenset({"ack_log_error", "reject_log_error"})

Wanted = Callable[[Any], bool]


# -- a message and its task ---------------------------------------------------------------


def late_options(task: Any) -> HeartbeatOptions:
    """Options of a task registered after the worker started: read, not remembered."""
    try:
        return resolve(task.app.conf, task)
    except ConfigurationError as exc:
        note_once(task.name, logging.ERROR, "%s; task %s runs without a heartbeat.", exc, task.name)
        return DISABLED


def heartbeat_of(
    request: Any,
    known: dict[str, HeartbeatOptions],
    *,
    carry_received: bool,
    settled: bool,
    time_limit: float | None = None,
) -> Heartbeat | None:
    """The heartbeat of a message just received (``task_received``'s *request*), or
    None if it gets none.

    *known* holds the options resolved at the worker's start. With *carry_received*
    the request carries the receipt time to the process that runs its task
    (:data:`RECEIVED`). With *settled* the heartbeat asks Celery's message whether
    Celery acknowledged it. Given *time_limit* (the worker's, in a pool that kills a
    task at its hard limit), the task's hard limit is its ``max_duration`` unless it
    sets one (:func:`hard_limit`)."""
    # For every message: a few lookups, one small object.
    task = request.task
    options = known.get(task.name) or late_options(task)
    if not options.enabled:
        return None
    if time_limit is not None and options.max_duration is None:
        limit = hard_limit(request, task, time_limit)
        if limit:
            options = _bounded(options, limit)
    message = request.message
    delivery_info = message.delivery_info or {}
    queue_url = delivery_info.get("sqs_queue")
    if not queue_url or message.acknowledged:
        return None  # not from SQS, or already settled
    now = time.monotonic()
    sqs_message = delivery_info.get("sqs_message")
    if carry_received:
        carried = request.request_dict
        carried["properties"] = {**(carried.get("properties") or {}), RECEIVED: now}
    return Heartbeat(
        message.delivery_tag,
        queue_url,
        options,
        now,
        task.name,
        request.id,
        (lambda: bool(message.acknowledged)) if settled else None,
        message_id=str(sqs_message.get("MessageId") or "") if sqs_message else "",
        receive_count=receive_count(sqs_message) if sqs_message else 0,
    )


def hard_limit(request: Any, task: Any, worker: float) -> float | None:
    """The hard time limit Celery gives *request*'s task: the message's own
    (``apply_async(time_limit=...)``), the task's, or the *worker*'s (0: none), as
    ``Request.execute_using_pool`` picks it."""
    limits = getattr(request, "time_limits", None) or (None, None)
    limit = limits[0] or getattr(task, "time_limit", None) or worker
    return float(limit) if isinstance(limit, (int, float)) and limit > 0 else None


@functools.lru_cache(maxsize=256)
def _bounded(options: HeartbeatOptions, limit: float) -> HeartbeatOptions:
    """*options* with *limit* for ``max_duration``: one object per task and limit."""
    return dataclasses.replace(options, max_duration=limit)


def worker_time_limit(worker: Any) -> float:
    """The worker's own hard time limit (``--time-limit``, ``task_time_limit``; 0: none)."""
    limit = getattr(worker, "time_limit", None)
    return float(limit) if isinstance(limit, (int, float)) and limit > 0 else 0.0


def receive_count(sqs_message: Any) -> int:
    """SQS's ``ApproximateReceiveCount`` of a received message (kombu's raw
    ``delivery_info["sqs_message"]``); 0 where kombu did not ask for it (5.4, and 5.5's
    gevent and eventlet path: ``docs/troubleshooting.md``, redeliveries)."""
    attributes = sqs_message.get("Attributes") if isinstance(sqs_message, dict) else None
    count = attributes.get("ApproximateReceiveCount") if attributes else None
    try:
        return int(count) if count else 0
    except (TypeError, ValueError):
        return 0


def running_heartbeat(
    task: Any, receipt_handle: str, request: Any, known: dict[str, HeartbeatOptions]
) -> Heartbeat:
    """The heartbeat of *task*, running here with Celery's *request* (``task.request``),
    as the process that runs it knows it: for its own extensions."""
    return Heartbeat(
        receipt_handle,
        str(request.properties["delivery_info"]["sqs_queue"]),
        known.get(task.name) or late_options(task),
        request.properties.get(RECEIVED) or time.monotonic(),
        task.name,
        request.id,
    )


def receipt_handle(request: Any) -> str | None:
    """The receipt handle of the message of a running task's *request* (Celery's
    ``task.request``, read once: it is a property); None: eager, or not from SQS."""
    try:
        return request.properties["delivery_tag"]  # type: ignore[no-any-return]
    except (TypeError, KeyError):
        return None


def give_up(request: Any) -> None:
    """Leave *request*'s message alone for good: its receipt handle may be stale (another
    worker may own the message by now), so neither Celery's failure handling (it checks
    ``acknowledged`` before it acks, rejects or requeues) nor kombu's release at exit
    may send it. From any thread: kombu takes acks from any."""
    request.acknowledged = True
    forget(request.message)


def expect(app: Any, error: type[BaseException], names: Iterable[str]) -> None:
    """Make *error* one the tasks *names* are expected to raise (``Task.throws``):
    Celery records it as their failure, and logs it at INFO, not as a bug at ERROR."""
    for name in names:
        task = app.tasks.get(name)
        throws = tuple(getattr(task, "throws", ()) or ())
        if task is not None and error not in throws:
            task.throws = (*throws, error)


def forget(message: Any) -> None:
    """Drop *message* from kombu's unacknowledged set without a call to SQS, so that
    kombu's release at exit sends nothing with its receipt handle."""
    message.channel.qos.ack(message.delivery_tag)


# -- the pool and the consumer ------------------------------------------------------------


def is_prefork(pool_cls: Any) -> bool:
    """Whether the worker's pool (``worker.pool_cls``) is prefork."""
    from celery.concurrency import get_implementation
    from celery.concurrency.prefork import TaskPool

    try:
        cls = get_implementation(pool_cls) if isinstance(pool_cls, str) else pool_cls
        return isinstance(cls, type) and issubclass(cls, TaskPool)
    except Exception:
        return False


def pool_size(worker: Any) -> int:
    """The most pool processes the worker may run: its concurrency, or the maximum of
    ``--autoscale max,min`` (both resolved by Celery only after ``worker_init``)."""
    autoscale = getattr(worker, "options", {}).get("autoscale") or ()
    if isinstance(autoscale, str):
        autoscale = [int(autoscale.partition(",")[0])]
    sizes = [n for n in (worker.concurrency, *autoscale[:1]) if isinstance(n, int)]
    return max(sizes) if sizes else os.cpu_count() or 1


def pool_name(worker: Any) -> str:
    """The pool's short name (``prefork``, ``thread``, ``solo``, ``gevent``...), at
    ``worker_ready``."""
    return type(getattr(worker, "pool", None)).__module__.rpartition(".")[2]


def is_green(consumer: Any) -> bool:
    """Whether the worker's pool is gevent's or eventlet's (at ``worker_ready``)."""
    return bool(getattr(getattr(consumer, "pool", None), "is_green", False))


def pool_process_index() -> int | None:
    """This prefork pool child's index (billiard's), at ``worker_process_init``."""
    from billiard.process import current_process  # type: ignore[import-untyped]

    index = getattr(current_process(), "index", None)
    return index if isinstance(index, int) else None


def put_before_pool(w: Any, step: Any) -> None:
    """Move worker *w*'s bootstep *step*, just included after the pool's, in front of
    it: bootsteps are ordered by their requirements alone, and none can say "before"."""
    try:
        from celery.worker.components import Pool
    except ImportError:  # moved: the drain runs after the pool's close, as it can
        return
    pool = next((s for s in getattr(w, "steps", ()) if isinstance(s, Pool)), None)
    if pool is not None:
        w.steps.remove(step)
        w.steps.insert(w.steps.index(pool), step)


def kombu_loader(consumer: Any) -> Any:
    """The botocore data loader of a client kombu already made for *consumer*, or None.

    kombu keeps its clients on the channel (``_sqs``, ``_predefined_queue_clients``) and
    botocore its loader on the client (``_loader``): both private, so this only looks,
    never creates, and any surprise means "none".
    """
    try:
        channel = consumer.connection.default_channel
        found: list[Any] = [getattr(channel, "_sqs", None)]
        found += list((getattr(channel, "_predefined_queue_clients", None) or {}).values())
    except Exception:
        return None
    return next((c._loader for c in found if getattr(c, "_loader", None) is not None), None)


# -- at shutdown: what waits in the worker ------------------------------------------------


def active_tags() -> set[str]:
    """The receipt handles of the tasks running in this worker."""
    from celery.worker.state import active_requests

    return {_tag(r) for r in tuple(active_requests)}


def is_active(request: Any) -> bool:
    from celery.worker.state import active_requests

    return request in active_requests


def send_deferred_settles(c: Any) -> int:
    """Send now the acks and rejects that Celery deferred in consumer *c*; how many.

    Without an event loop (the gevent and eventlet pools), Celery 5.4 to 5.6 queue each
    task's ack or reject in ``Consumer._pending_operations``, which runs only at the top of
    the consumer's next turn. A warm shutdown ends the loop without that turn, so a task
    that finished in its last seconds is still unacknowledged when kombu releases what is
    unacknowledged at exit: its message is made visible again, and another worker runs it
    a second time. (Celery 5.7 sends acks at once: ``Consumer.call_soon_ack``.)
    Remote-control operations queued beside them are left as Celery leaves them.
    """
    pending = getattr(c, "_pending_operations", None)
    if not pending or getattr(c, "hub", None) is not None:
        return 0
    settles = [p for p in tuple(pending) if _is_settle(p)]
    for operation in settles:
        pending.remove(operation)
        try:
            operation()
        except Exception:  # kombu logs a broker's error itself; this is anything else
            logger.exception(
                "celery-sqs-heartbeat: could not send a deferred acknowledgement at "
                "shutdown; kombu releases that message at exit."
            )
    if settles:
        logger.info(
            "celery-sqs-heartbeat: shutting down, sent %d acknowledgement(s) of finished "
            "tasks that Celery had deferred, before kombu releases what is unacknowledged.",
            len(settles),
        )
    return len(settles)


def _is_settle(operation: Any) -> bool:
    """Whether a deferred operation (a ``vine.promise``) acks or rejects a message."""
    from kombu.message import Message

    fun = getattr(operation, "fun", None)
    return getattr(fun, "__name__", "") in SETTLES and isinstance(
        getattr(fun, "__self__", None), Message
    )


def _tag(request: Any) -> str:
    return str(request.message.delivery_tag)


def _request(candidate: Any) -> Any:
    """*candidate* if it is a Celery request, else None."""
    from celery.worker.request import Request

    return candidate if isinstance(candidate, Request) else None


def semaphore_waiters(w: Any, wanted: Wanted) -> Iterator[Any]:
    """Prefork requests waiting for a free pool process (``kombu``'s
    ``LaxBoundedSemaphore``: ``(callback, args, kwargs)`` each), taken off the queue."""
    waiting = getattr(getattr(w, "semaphore", None), "_waiting", None)
    if waiting is None:
        return
    for entry in tuple(waiting):
        args = entry[1] if len(entry) > 1 else ()
        request = _request(args[0]) if args else None
        if request is not None and wanted(request):
            waiting.remove(entry)
            yield request


def unwritten_jobs(w: Any, wanted: Wanted) -> Iterator[Any]:
    """Prefork jobs in the pool's outbound buffer that no child process was chosen for
    (``AsynPool.schedule_writes`` sets ``_scheduled_for`` and ``_write_to`` as it
    begins a write; a child that took the job sets ``_accepted``), discarded."""
    from celery.worker.state import reserved_requests

    buffer = getattr(getattr(getattr(w, "pool", None), "_pool", None), "outbound_buffer", None)
    if not buffer:
        return
    by_job: dict[int, Any] = {}
    for request in tuple(reserved_requests):
        ref = getattr(request, "_apply_result", None)
        job = ref() if ref is not None else None
        if job is not None:
            by_job[id(job)] = request
    for job in tuple(buffer):
        request = by_job.get(id(job))
        if (
            request is not None
            and not job._accepted
            and job._write_to is None
            and job._scheduled_for is None
            and wanted(request)
        ):
            buffer.remove(job)
            job.discard()
            yield request


def timer_entries(w: Any, wanted: Wanted) -> Iterator[Any]:
    """ETA and countdown requests in the event loop's timer, their entries cancelled.
    Only kombu's event-loop timer (prefork, threads, solo): the green pools' timers are
    their own."""
    from kombu.asynchronous.timer import Timer

    timer = getattr(w, "timer", None)
    if not isinstance(timer, Timer):
        return
    for scheduled in timer.queue:
        entry = scheduled[2]
        args = getattr(entry, "args", None) or ()
        request = _request(args[0]) if args else None
        if (
            request is not None
            and not entry.canceled
            and getattr(entry.fun, "__name__", "") in ETA_CALLBACKS
            and wanted(request)
        ):
            timer.cancel(entry)  # type: ignore[no-untyped-call]
            yield request


def queued_in_executor(w: Any, wanted: Wanted) -> list[Any]:
    """Celery 5.7 threads-pool requests still queued in the executor, cancelled.

    The pool keeps no reference to its futures (the request's ``_apply_result`` is a
    weak reference to an object nothing else holds), so the executor's queue is read:
    emptied, each wanted item's future cancelled, and the others put back in order. A
    thread that frees up meanwhile waits for them; an item taken out never runs.
    """
    import celery
    from celery.concurrency.thread import TaskPool

    pool = getattr(w, "pool", None)
    queue = getattr(getattr(pool, "executor", None), "_work_queue", None)
    if (
        tuple(celery.VERSION[:2]) < THREADS_CANCEL_QUEUED
        or not isinstance(pool, TaskPool)
        or queue is None
    ):
        return []
    items, taken = [], []
    try:
        with contextlib.suppress(Empty):
            while True:
                items.append(queue.get_nowait())
        for item in list(items):
            # A _WorkItem of ``executor.submit(apply_target, target, args, kwargs,
            # callback, ...)``: its callback is the request's ``on_success``.
            submitted: tuple[Any, ...] = getattr(item, "args", None) or ()
            callback = submitted[3] if len(submitted) > 3 else None
            request = _request(getattr(callback, "__self__", None))
            future = getattr(item, "future", None)
            if (
                request is not None
                and isinstance(future, Future)
                and wanted(request)
                and future.cancel()
            ):
                items.remove(item)
                taken.append(request)
    finally:
        for item in items:
            queue.put(item)
    return taken
