"""Figure 1: what the heartbeat adds to one task, through Celery's own signals.

A registered task goes through what a worker does for every message: the consumer sends
``task_received`` for it, then the tracer pushes the request (with SQS message
properties), sends ``task_prerun`` and ``task_postrun``, and pops the request. Arms are
interleaved round by round so that machine drift hits all alike:

* baseline: no heartbeat receivers at all;
* heartbeat: this package in a threads (solo, green) worker's main process, which runs
  all three handlers: the message's heartbeat made at receipt, its task's start and end.
  The task is shorter than one interval, so no call;
* heartbeat, prefork child: the two handlers a pool child runs (its slot's writes; the
  receipt is the main process's);
* heartbeat, heartbeat process: the three handlers of a threads (solo, green) worker whose
  beats come from its heartbeat process (the default): the message handed to that process
  at receipt, its task's slot written at start and end;
* naive: a hand-written heartbeat that starts one thread per task at prerun and stops
  and joins it at postrun;
* dispatch: three receivers that do nothing, i.e. what Celery's signal dispatch alone
  costs any signal-based design, ours included.
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Any

from celery import Celery, signals

import celery_sqs_heartbeat
from celery_sqs_heartbeat import _handlers, _process, _roles

from ._stats import percentile

QUEUE_URL = "http://127.0.0.1:9/123456789012/bench"
#: Rounds of each arm, alternating their order; samples per arm per round.
ROUNDS = 80
PER_ROUND = 250
#: The signals of one message, in the order a worker sends them.
SIGNALS = (signals.task_received, signals.task_prerun, signals.task_postrun)


class _Stand:
    """What a handler reads of Celery's request and kombu's message: a stand-in, so the
    baseline does not pay for building Celery's own."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


def _message(task: Any, i: int) -> tuple[str, Any]:
    handle = f"rh-{i}"
    message = _Stand(
        delivery_tag=handle, delivery_info={"sqs_queue": QUEUE_URL}, acknowledged=False
    )
    return handle, _Stand(task=task, message=message, id=handle, request_dict={})


def _one(task: Any, handle: str, request: Any) -> int:
    t0 = time.perf_counter_ns()
    signals.task_received.send(sender=None, request=request)
    task.push_request(
        id=handle,
        is_eager=False,
        properties={"delivery_tag": handle, "delivery_info": {"sqs_queue": QUEUE_URL}},
    )
    signals.task_prerun.send(sender=task, task_id=handle, task=task, args=(), kwargs={})
    signals.task_postrun.send(
        sender=task, task_id=handle, task=task, args=(), kwargs={}, retval=None, state="SUCCESS"
    )
    task.pop_request()
    took = time.perf_counter_ns() - t0
    request.message.acknowledged = True  # as Celery acknowledges it after postrun
    return took


def _own_time(task: Any, handlers: list[tuple[Any, Any]], count: int) -> list[float]:
    """Per task of *count*, microseconds spent inside our three handlers, timed where
    Celery calls them (one more arm of the round, so that drift hits it alike).

    On a shared virtual machine the 99th percentile of a ~20 µs loop is set by timer
    interrupts and steal time, which hit a longer sample more often; this isolates what
    the handlers themselves take.
    """
    spent: list[int] = []
    timed = []
    for n, (signal, handler) in enumerate(handlers):

        def timing(handler: Any = handler, first: bool = n == 0, **kw: Any) -> None:
            t0 = time.perf_counter_ns()
            handler(**kw)
            took = time.perf_counter_ns() - t0
            if first:
                spent.append(took)
            else:
                spent[-1] += took

        signal.connect(timing, weak=False)
        timed.append((signal, timing))
    try:
        for i in range(count):
            _one(task, *_message(task, i))
    finally:
        for signal, timing in timed:
            signal.disconnect(timing)
    return [v / 1000 for v in spent]


def _nothing(**_: Any) -> None:
    """A receiver that does nothing: measures the dispatch alone."""


class Naive:
    """One thread per task, each beating on an Event-driven loop, joined at postrun."""

    def __init__(self) -> None:
        self.threads: dict[str, tuple[threading.Thread, threading.Event]] = {}

    def prerun(self, task_id: str = "", **_: Any) -> None:
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(30):
                pass  # a real one would call ChangeMessageVisibility here

        thread = threading.Thread(target=beat, daemon=True)
        self.threads[task_id] = (thread, stop)
        thread.start()

    def postrun(self, task_id: str = "", **_: Any) -> None:
        thread, stop = self.threads.pop(task_id)
        stop.set()
        thread.join()


class _Worker(_Stand):
    __hash__ = object.__hash__  # Celery's signals cache receivers by sender


def run() -> dict[str, Any]:
    app = Celery("bench", broker="sqs://127.0.0.1:9", set_as_current=False)
    app.conf.update(sqs_heartbeat_enabled=True, task_acks_late=True)

    @app.task(name="bench.noop")
    def _noop() -> None: ...

    noop = app.tasks["bench.noop"]  # the registered task object, as the worker sends it

    naive = Naive()
    samples: dict[str, list[int]] = {
        "baseline": [],
        "heartbeat": [],
        "child": [],
        "heartbeat_process": [],
        "naive": [],
        "dispatch": [],
    }
    # The roles as a worker builds them at worker_init (and worker_process_init), with
    # the sidecar thread and its client made before the first task. Each round then
    # connects only the arm's handlers.
    celery_sqs_heartbeat.install(app)
    handlers = [(sig, fn) for sig, fn in _handlers._HANDLERS if sig in SIGNALS]
    for sig, fn in _handlers._HANDLERS:
        sig.disconnect(fn, dispatch_uid=f"celery_sqs_heartbeat.{fn.__name__}")
    delegating = _roles.for_worker(_Worker(app=app, pool_cls="threads", concurrency=1, options={}))
    app.conf.sqs_heartbeat_own_process = False
    threads = _roles.for_worker(_Worker(app=app, pool_cls="threads", concurrency=1, options={}))
    prefork = _roles.for_worker(_Worker(app=app, pool_cls="prefork", concurrency=1, options={}))
    assert isinstance(threads, _roles.Main) and isinstance(prefork, _roles.Main)
    assert isinstance(delegating, _roles.Delegating)
    assert prefork.slots is not None
    threads.local.start()
    child = _roles.Child(prefork, prefork.slots, 0)
    arms: dict[str, tuple[Any, list[tuple[Any, Any]]]] = {
        "heartbeat": (threads, handlers),
        "child": (child, handlers[1:]),
        "heartbeat_process": (delegating, handlers),
        "naive": (None, [(SIGNALS[1], naive.prerun), (SIGNALS[2], naive.postrun)]),
        "dispatch": (None, [(sig, _nothing) for sig in SIGNALS]),
    }

    own: list[float] = []

    def arm(name: str) -> None:
        if name == "own":
            _process.become(threads)
            own.extend(_own_time(noop, handlers, PER_ROUND))
            return
        role, receivers = arms.get(name, (None, []))
        if role is not None:
            _process.become(role)
        for sig, fn in receivers:
            sig.connect(fn, weak=False)
        messages = [_message(noop, i) for i in range(PER_ROUND)]
        try:
            for handle, request in messages:
                samples[name].append(_one(noop, handle, request))
        finally:
            for sig, fn in receivers:
                sig.disconnect(fn)

    names = [*samples, "own"]
    for name in names:  # warm-up: imports, caches
        arm(name)
        samples.get(name, own).clear()
    gc.collect()
    gc.disable()
    try:
        for r in range(ROUNDS):
            for name in names if r % 2 == 0 else reversed(names):
                arm(name)
    finally:
        gc.enable()
        threads.shutdown()
        delegating.shutdown()
        celery_sqs_heartbeat.uninstall()

    us = {k: [v / 1000 for v in vs] for k, vs in samples.items()}
    p50 = {k: percentile(v, 50) for k, v in us.items()}
    p99 = {k: percentile(v, 99) for k, v in us.items()}
    added50 = p50["heartbeat"] - p50["baseline"]
    child50 = p50["child"] - p50["baseline"]
    added99 = p99["heartbeat"] - p99["baseline"]
    naive50 = p50["naive"] - p50["baseline"]
    return {
        "own_p50_us": percentile(own, 50),
        "own_p99_us": percentile(own, 99),
        "dispatch_p50_us": p50["dispatch"] - p50["baseline"],
        "dispatch_p99_us": p99["dispatch"] - p99["baseline"],
        "samples": len(us["baseline"]),
        "p50": p50,
        "p99": p99,
        "added_p50_us": added50,
        "added_p99_us": added99,
        "child_added_p50_us": child50,
        "child_added_p99_us": p99["child"] - p99["baseline"],
        "beat_added_p50_us": p50["heartbeat_process"] - p50["baseline"],
        "beat_added_p99_us": p99["heartbeat_process"] - p99["baseline"],
        "naive_added_p50_us": naive50,
        "cheaper_than_naive": naive50 / added50 if added50 > 0 else float("inf"),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
