"""One lease keeper per worker process: it renews the leases of every attempt the process holds in one
UPDATE per period, where a renewing thread per attempt made a thousand calls in flight cost a
thousand transactions every period."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from imagegate.app.stores.attempts import AttemptStore, Claim

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(self, store: AttemptStore, lease_s: float):
        self._store = store
        self._lease_s = lease_s
        # (task, attempt) -> when (monotonic) its lease was last known to be set.
        self._held: dict[tuple[uuid.UUID, int], float] = {}
        self._lock = threading.Lock()
        self._renewer: threading.Thread | None = None

    @contextmanager
    def held(self, claim: Claim) -> Iterator[None]:
        """Keep the claim's lease renewed while the block runs (its calls and its final write)."""
        key = (claim.task_id, claim.attempt)
        with self._lock:
            self._held[key] = time.monotonic()
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(target=self._renew_forever, name="lease-keeper", daemon=True)
                self._renewer.start()
        try:
            yield
        finally:
            with self._lock:
                self._held.pop(key, None)

    def valid_for_s(self, claim: Claim) -> float:
        """How long the claim's lease surely lasts yet (0 when it may have expired)."""
        with self._lock:
            renewed = self._held.get((claim.task_id, claim.attempt))
        return 0.0 if renewed is None else max(0.0, renewed + self._lease_s - time.monotonic())

    def _renew_forever(self) -> None:
        while True:
            time.sleep(self._lease_s / 3)
            with self._lock:
                keys = list(self._held)
            if not keys:
                continue
            started = time.monotonic()
            try:
                self._store.extend_leases(keys, self._lease_s)
            except Exception as exc:  # the database is away: the calls go on, the next period tries again
                log.warning("could not renew %d leases: %s", len(keys), exc)
                continue
            with self._lock:
                for key in keys:
                    if key in self._held:
                        self._held[key] = started
