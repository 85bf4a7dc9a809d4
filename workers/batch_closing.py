"""Closing a batch once its last task ended, checked once per batch at a time rather than once per
task: a batch's tasks end together by the hundred, and a check each (one transaction that looks for
any unfinished task of the batch) was the worker's largest single cost while draining a batch."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

# Pause before checking again a batch whose tasks ended during its last check: a batch is checked at
# most ~4 times a second while it drains, and closes at most this much after its last task ended.
RECHECK_AFTER_S = 0.25


class BatchClosing:
    """`touched(batch_id)` after a task of the batch ended (committed). At most one check of a batch
    runs at a time; ends arriving during it make one more check after it, so a check always starts
    after the last end was committed (what lets the last one see every other task ended). The caller
    that finds no check running makes the checks; the others return at once. A check that raises
    leaves the batch open for the sweeper, which checks every open batch on each pass."""

    def __init__(self, check: Callable[[uuid.UUID], object], recheck_after_s: float = RECHECK_AFTER_S):
        self._check = check
        self._recheck_after_s = recheck_after_s
        self._lock = threading.Lock()
        # batch -> whether another end arrived since its running check started.
        self._running: dict[uuid.UUID, bool] = {}

    def touched(self, batch_id: uuid.UUID) -> None:
        with self._lock:
            if batch_id in self._running:
                self._running[batch_id] = True
                return
            self._running[batch_id] = False
        done = False
        try:
            while not done:
                self._check(batch_id)
                with self._lock:  # seen and cleared under one lock: no end slips in between
                    done = not self._running[batch_id]
                    if done:
                        del self._running[batch_id]
                    else:
                        self._running[batch_id] = False
                if not done:
                    time.sleep(self._recheck_after_s)
        finally:
            if not done:
                with self._lock:
                    self._running.pop(batch_id, None)
