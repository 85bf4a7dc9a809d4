"""An attempt's final writes, made durable: retried through a database outage while the lease
holds, with the image bytes put in the image store before the rows that point at them."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.exc import InterfaceError, OperationalError

from imagegate.app.grouping import GroupInterrupted
from imagegate.app.image_store import ImageStore
from imagegate.app.state.refused import Outcome
from imagegate.app.stores.attempts import AttemptStore, Claim, NewImage
from imagegate.workers.images import discard_unwritten, put_while_leased
from imagegate.workers.leases import LeaseKeeper

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DurableWrites:
    store: AttemptStore
    leases: LeaseKeeper
    image_store: ImageStore

    def write(self, claim: Claim, write: Callable[..., Outcome], *args, **kwargs) -> Outcome:
        """Make an attempt's write, retrying through a database outage while the lease is still ours:
        the upstream has answered (and been paid), so its result is kept in memory rather than thrown
        away and bought again by the attempt that would take over once the lease expired. The write is
        fenced, so a retry after a commit whose reply was lost is refused, not applied twice."""
        pause = 0.2
        while True:
            try:
                return write(*args, **kwargs)
            # GroupInterrupted: the writer of this write's group ended before it knew the outcome
            # (workers/grouped.py); another writer takes the retry.
            except (OperationalError, InterfaceError, GroupInterrupted) as exc:
                left = self.leases.valid_for_s(claim) - pause - 1.0
                if left <= 0:
                    raise
                log.warning(
                    "task %s attempt %s: final write not made (%s); retrying for up to %.0f s",
                    claim.task_id,
                    claim.attempt,
                    type(exc).__name__,
                    left,
                )
                time.sleep(pause)
                pause = min(pause * 2, 2.0)

    def put(self, claim: Claim, images: list[NewImage]) -> list[NewImage]:
        return put_while_leased(self.image_store, claim.task_id, images, lambda: self.leases.valid_for_s(claim))

    def write_pointing_at(
        self, claim: Claim, images: list[NewImage], write: Callable[..., Outcome], *args, **kwargs
    ) -> Outcome:
        """`write`, for rows pointing at images already put: refused, it takes back their bytes."""
        written = self.write(claim, write, *args, **kwargs)
        if not written:
            discard_unwritten(self.image_store, self.store, images)
        return written
