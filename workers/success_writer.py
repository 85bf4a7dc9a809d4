"""Successes are written in groups: each call of `succeed` waits for a writer that commits every
success queued meanwhile in one transaction. Under load that turns hundreds of commits a second
into a few; alone, a success is written at once, as before, so no latency is added."""

from __future__ import annotations

import logging
import queue
import sys
import threading
from concurrent.futures import Future

from app.attempt_store import AttemptStore, Success

log = logging.getLogger(__name__)

# A group's images travel in one transaction: a few megabytes each. Several writers, so one slow
# commit does not hold every success behind it.
MAX_GROUP = 50
WRITERS = 4


class SuccessWriter:
    def __init__(self, store: AttemptStore):
        self._store = store
        self._queue: queue.SimpleQueue[tuple[Success, Future]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._native = _native_threads(WRITERS)

    def _run(self, function, *args):
        """Under gevent, the write runs on a native thread: there the driver blocks on its socket
        (the GIL released) instead of waiting for the event loop's turn after every send and receive,
        which with a thousand calls in flight made each group's commit take seconds."""
        if self._native is None:
            return function(*args)
        return self._native.apply(function, args)

    def succeed(self, success: Success) -> bool:
        """True once written; False when the fence refused it (the attempt is no longer ours, or it
        was cancelled). A database error is raised to the caller, who may try again."""
        future: Future[bool] = Future()
        self._queue.put((success, future))
        self._ensure_running()
        return future.result()

    def _ensure_running(self) -> None:
        with self._lock:
            self._threads = [thread for thread in self._threads if thread.is_alive()]
            while len(self._threads) < WRITERS:
                thread = threading.Thread(target=self._write_forever, name="success-writer", daemon=True)
                thread.start()
                self._threads.append(thread)

    def _write_forever(self) -> None:
        while True:
            group = [self._queue.get()]
            while len(group) < MAX_GROUP:
                try:
                    group.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                written = self._run(self._store.succeed_many, [success for success, _ in group])
            except Exception as exc:  # each waiter gets the error and decides (retry while its lease holds)
                for _, future in group:
                    future.set_exception(exc)
                continue
            for (_, future), ok in zip(group, written):
                future.set_result(ok)


def _native_threads(size: int):
    """A pool of real OS threads when gevent has patched threading, else None."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("threading"):
        return None
    from gevent.threadpool import ThreadPool

    return ThreadPool(size)
