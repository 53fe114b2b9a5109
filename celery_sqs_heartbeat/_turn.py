"""Which beats one turn of the sidecar's loop takes: a pure sort of a copy of the
registry, so that a test reaches it without a loop, a lock or a clock.

A beat that is due goes now. One that falls due within ``RIDE_FRACTION`` of its interval
rides along, where a request to its queue has a free place: it costs no request of its
own, and its next beats fall due together with the others'.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

from ._heartbeat import RIDE_FRACTION, Heartbeat
from ._send import MAX_BATCH


class Turn(NamedTuple):
    """What one look at the registry found."""

    settled: list[Heartbeat]
    #: (heartbeat, latest due time to send it now): the due beats, then the riders.
    candidates: list[tuple[Heartbeat, float]]


def look(beats: Iterable[Heartbeat], now: float) -> Turn:
    """Sort *beats* (a copy of the registry, read without the lock): what Celery settled,
    what is due, and what is due soon enough to take a free place in a request."""
    settled: list[Heartbeat] = []
    due: list[Heartbeat] = []
    soon: list[Heartbeat] = []
    for hb in beats:
        if hb.in_flight or hb.ended is not None:
            continue
        if hb.is_settled is not None and hb.is_settled():
            settled.append(hb)
        elif hb.next_due <= now:
            due.append(hb)
        elif not hb.first and hb.next_due <= now + RIDE_FRACTION * hb.options.interval:
            soon.append(hb)
    candidates = [(hb, now) for hb in sorted(due, key=_next_due)]
    free: dict[str, int] = {}
    for hb, _ in candidates:
        free[hb.queue_url] = (free.get(hb.queue_url, 0) - 1) % MAX_BATCH
    for hb in sorted(soon, key=_next_due):
        if free.get(hb.queue_url):
            free[hb.queue_url] -= 1
            candidates.append((hb, now + RIDE_FRACTION * hb.options.interval))
    return Turn(settled, candidates)


def earliest(beats: Iterable[Heartbeat]) -> float:
    """When the first of *beats* not in flight is due (an answer wakes the loop itself)."""
    return min(
        (hb.next_due for hb in beats if hb.ended is None and not hb.in_flight), default=math.inf
    )


def _next_due(hb: Heartbeat) -> float:
    return hb.next_due
