"""Database writes in groups: a call waits for a writer that makes every call queued meanwhile in
one transaction. Under load that turns hundreds of commits a second into a few, and per-task
round trips into per-group ones; alone, a call is written at once, so no latency is added."""

from __future__ import annotations

import logging
import queue
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class Grouped(Generic[Item, Result]):
    """Calls of `write_many(items) -> results` (one result per item, in order) made one item at a time
    from many greenlets or threads. `max_group` bounds a transaction's size (a group of successes
    carries its images); several writers so one slow commit does not hold every call behind it.
    `native`: under gevent, make the writes on native threads (see `_native_threads`)."""

    def __init__(
        self,
        write_many: Callable[[list[Item]], list[Result]],
        *,
        name: str,
        max_group: int = 50,
        writers: int = 4,
        native: bool = True,
    ):
        self._write_many = write_many
        self._name = name
        self._max_group = max_group
        self._writers = writers
        self._queue: queue.SimpleQueue[tuple[Item, Future]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        # native=False: the writers stay greenlets under gevent (what they call must run on the hub).
        self._native = None if native else False

    def __call__(self, item: Item) -> Result:
        """The item's result once written; a database error is raised to the caller, who may retry."""
        future: Future[Result] = Future()
        self._queue.put((item, future))
        self._ensure_running()
        return future.result()

    def _ensure_running(self) -> None:
        with self._lock:
            self._threads = [thread for thread in self._threads if thread.is_alive()]
            while len(self._threads) < self._writers:
                thread = threading.Thread(target=self._write_forever, name=self._name, daemon=True)
                thread.start()
                self._threads.append(thread)
            if self._native is None:
                self._native = _native_threads(self._writers)

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
                results = self._native.apply(self._write_many, (items,)) if self._native else self._write_many(items)
            except Exception as exc:  # each caller gets the error and decides (retry while its lease holds)
                for _, future in group:
                    future.set_exception(exc)
                continue
            for (_, future), result in zip(group, results, strict=True):
                future.set_result(result)


def _native_threads(size: int):
    """Under gevent, a pool of real OS threads for the writes: there the database driver blocks on
    its socket with the GIL released instead of waiting for the event loop's turn after every send
    and receive, which with a thousand calls in flight made each group's commit take seconds."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("threading"):
        return False
    from gevent.threadpool import ThreadPool

    return ThreadPool(size)
