"""Task ends announced in groups: the worker's ends arrive many at a time (successes are written in
groups), and a PUBLISH round trip per task was ~5% of its CPU. An end is queued and the call returns;
one announcer sends every end queued meanwhile in one pipeline. A lost announcement only delays a
waiting synchronous request, which also re-reads its task on a growing interval."""

from __future__ import annotations

import logging
import queue
import threading
from contextlib import AbstractContextManager

from imagegate.app.wakeups import Wakeup, Wakeups

log = logging.getLogger(__name__)

MAX_GROUP = 500


class GroupedAnnouncements:
    """A Wakeups whose `announce` is sent grouped (the rest is the wrapped one's)."""

    def __init__(self, wakeups: Wakeups):
        self._wakeups = wakeups
        self._queue: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._sender: threading.Thread | None = None

    def announce(self, task_id: str) -> None:
        self._queue.put(task_id)
        with self._lock:
            if self._sender is None or not self._sender.is_alive():
                self._sender = threading.Thread(target=self._send_forever, name="announcements", daemon=True)
                self._sender.start()

    def announce_many(self, task_ids: list[str]) -> None:
        for task_id in task_ids:
            self.announce(task_id)

    def subscription(self, task_id: str) -> AbstractContextManager[Wakeup]:
        return self._wakeups.subscription(task_id)

    def close(self) -> None:
        self._wakeups.close()

    def _send_forever(self) -> None:
        while True:
            group = [self._queue.get()]
            while len(group) < MAX_GROUP:
                try:
                    group.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._wakeups.announce_many(group)
            except Exception as exc:
                log.warning("could not announce the end of %d task(s): %s", len(group), exc)
