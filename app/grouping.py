"""Group commit for the API: concurrent requests' calls of one operation (the INSERT of a task, the
publish of its message) made together, one database statement or one broker round trip per group.

No thread of its own: the first caller finds no group running and runs its item at once, alone (no
latency added when idle). Callers arriving meanwhile wait; when the running group ends, the first of
them leads the next group, made of everyone who waited (up to `max_group`). Under load a group
holds what arrived during one round trip; each caller still returns only once its own item is done.
Works with gevent's greenlets (the API) and with plain threads (tests, the embedded mode). The
worker groups its writes with a pool of writers instead (workers/grouped.py says why).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class GroupInterrupted(RuntimeError):
    """The caller leading the group was interrupted (its greenlet killed, a timeout) before the
    group's outcome was known: whether the items were done is uncertain."""


class _Slot(Generic[Item]):
    __slots__ = ("item", "ready", "leads", "outcome")

    def __init__(self, item: Item) -> None:
        self.item = item
        self.ready = threading.Event()
        self.leads = False
        self.outcome: object = None


class Grouped(Generic[Item, Result]):
    """`grouped(item)` returns `run_many(items)`'s result for that item. `run_many` returns one
    outcome per item, in order; an outcome that is an exception is raised to that item's caller alone,
    and an exception raised by `run_many` is raised to every caller of the group."""

    def __init__(self, run_many: Callable[[list[Item]], list[Result | BaseException]], *, max_group: int) -> None:
        self._run_many = run_many
        self._max_group = max_group
        self._lock = threading.Lock()
        self._waiting: list[_Slot[Item]] = []
        self._running = False

    @property
    def waiting(self) -> int:
        """Callers whose item is not in a running group yet."""
        with self._lock:
            return len(self._waiting)

    def __call__(self, item: Item) -> Result:
        slot = _Slot(item)
        with self._lock:
            self._waiting.append(slot)
            leads = not self._running
            self._running = True
        if not leads:
            slot.ready.wait()
        if leads or slot.leads:
            self._lead()
        if isinstance(slot.outcome, BaseException):
            raise slot.outcome
        return slot.outcome  # type: ignore[return-value]

    def _lead(self) -> None:
        """Run the group of everyone waiting (the leader is its first), give each its outcome, and
        hand the lead to the first caller that arrived meanwhile."""
        with self._lock:
            group = self._waiting[: self._max_group]
            del self._waiting[: self._max_group]
        outcomes: list | None = None
        try:
            outcomes = self._run_many([slot.item for slot in group])
            if len(outcomes) != len(group):
                raise RuntimeError(f"{len(outcomes)} outcomes for a group of {len(group)}")
        except Exception as exc:
            outcomes = [exc] * len(group)
        finally:
            if outcomes is None:  # a BaseException (GreenletExit, a Timeout) is on its way up
                interrupted = GroupInterrupted("the request leading this group was interrupted")
                outcomes = [interrupted] * len(group)
            for slot, outcome in zip(group, outcomes, strict=True):
                slot.outcome = outcome
                slot.ready.set()
            with self._lock:
                if self._waiting:
                    nxt = self._waiting[0]
                    nxt.leads = True
                    nxt.ready.set()
                else:
                    self._running = False
