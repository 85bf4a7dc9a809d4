"""Database writes in groups: a call waits for a writer that makes every call queued meanwhile in
one transaction. Under load that turns hundreds of commits a second into a few, and per-task
round trips into per-group ones; alone, a call is written at once, so no latency is added.

Not the API's leader-based helper (app/grouping.py), where a caller finding a leader free runs its
item at once: in the worker that made the groups smaller, and cost more Postgres CPU per task
(docs/performance.md, the eighth session). A writer here is woken through the hub, and more calls
queue behind the first meanwhile."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Generic, TypeVar

from imagegate.app.grouping import GroupInterrupted

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class Grouped(Generic[Item, Result]):
    """Calls of `write_many(items) -> results` (one result per item, in order) made one item at a time
    from many greenlets or threads. `max_group` bounds a transaction's size (a group of successes
    carries its images); `writers` of them (successes have several, so one slow commit does not
    hold every success behind it; claims one, workers/grouped_claims.py says why).
    Under gevent the writers are greenlets: writes on native threads were measured no faster under
    load (grouped, they are few) and ~1 ms slower for a lone request."""

    def __init__(
        self,
        write_many: Callable[[list[Item]], list[Result]],
        *,
        name: str,
        max_group: int = 50,
        writers: int = 4,
    ):
        self._write_many = write_many
        self._name = name
        self._max_group = max_group
        self._writers = writers
        self._queue: queue.SimpleQueue[tuple[Item, Future]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def __call__(self, item: Item) -> Result:
        """The item's result once written; a database error is raised to the caller, who may retry, and
        so is GroupInterrupted when the writer ended before it knew its group's outcome."""
        future: Future[Result] = Future()
        self._queue.put((item, future))
        self._ensure_running()
        return future.result()

    def _ensure_running(self, ending: threading.Thread | None = None) -> None:
        """Start writers up to the count; `ending`, a writer on its way out, no longer counts."""
        with self._lock:
            self._threads = [thread for thread in self._threads if thread.is_alive() and thread is not ending]
            while len(self._threads) < self._writers:
                thread = threading.Thread(target=self._write_forever, name=self._name, daemon=True)
                thread.start()
                self._threads.append(thread)

    def _write_forever(self) -> None:
        while True:
            group = [self._queue.get()]
            while len(group) < self._max_group:
                try:
                    group.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            items = [item for item, _ in group]
            try:
                results = self._write_many(items)
            except Exception as exc:  # each caller gets the error and decides (retry while its lease holds)
                for _, future in group:
                    future.set_exception(exc)
                continue
            except BaseException as exc:  # GreenletExit, a Timeout: this writer ends; no caller may wait forever
                for _, future in group:
                    future.set_exception(GroupInterrupted(f"the {self._name} writer was interrupted: {exc!r}"))
                log.warning("the %s writer was interrupted (%r); another takes its place", self._name, exc)
                self._ensure_running(ending=threading.current_thread())  # for the calls queued behind
                return
            for (_, future), result in zip(group, results, strict=True):
                future.set_result(result)
