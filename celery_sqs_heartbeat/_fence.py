"""The sidecar's side of the slots (``_slots.Slots``): what each task's slot says just
before its beat is sent, what the sidecar tells a task whose message was lost, and a
broken slot said once, not raised: its messages are then beaten until Celery settles
them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol

from ._heartbeat import Heartbeat
from ._slots import SlotsBroken, SlotView, key_of

logger = logging.getLogger("celery_sqs_heartbeat")


class Fence(Protocol):
    """The slots, as the beating process uses them."""

    def begin(self, key: int, index: int | None) -> SlotView | None: ...

    def finish(self, index: int) -> None: ...

    def lose(self, index: int | None, key: int, reason: int, until: float) -> None: ...


class Fenced:
    """A :class:`Fence` whose broken slot is said once (at ERROR) and never raised."""

    def __init__(self, fence: Fence) -> None:
        self._fence = fence
        self._broken = False

    def read(self, beats: Iterable[Heartbeat], views: dict[Heartbeat, SlotView]) -> None:
        """What the slots say of *beats*' tasks, into *views* as it goes (so that the
        caller finishes those read before an error); each running task's slot counts
        its beat in flight from here (:meth:`finish` uncounts it)."""
        for hb in beats:
            try:
                view = self._fence.begin(key_of(hb.receipt_handle), hb.slot)
            except SlotsBroken as exc:  # beaten unfenced, until Celery settles it
                self._say_broken(exc)
                continue
            if view is not None:
                views[hb] = view

    def finish(self, views: Iterable[SlotView]) -> None:
        """The beats :meth:`read` counted in flight have been answered (or not sent)."""
        for view in views:
            if view.fenced:
                try:
                    self._fence.finish(view.index)
                except SlotsBroken as exc:
                    self._say_broken(exc)

    def lose(self, hb: Heartbeat, reason: int) -> None:
        """Tell *hb*'s task, in its slot, that its message was lost (``current().lost``),
        if no beat found it there yet (``hb.slot`` None): looked for."""
        try:
            self._fence.lose(hb.slot, key_of(hb.receipt_handle), reason, hb.visible_until)
        except SlotsBroken as exc:
            self._say_broken(exc)

    def _say_broken(self, exc: SlotsBroken) -> None:
        if not self._broken:
            self._broken = True
            logger.error(
                "celery-sqs-heartbeat: %s; the messages of that slot's tasks are beaten "
                "until Celery settles them (a beat may land just after the delete). "
                "Restart the worker to map new slots (said once).",
                exc,
            )
