"""Deleting stored images: their bytes in the image store first, then their rows. In that order a
failure leaves rows whose bytes are gone (readers skip them, and the next pass deletes them again),
never bytes that no row points at any more.

`delete_for_tasks` is what deleting a task's images (DELETE /v1/images/{id}) calls; `expire_ended_before`
is retention: the sweeper's small batch each pass, and `imagegate images purge`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, delete, select

from imagegate.app.image_store import ImageStore
from imagegate.app.models import Image, Task, utcnow
from imagegate.app.state import tasks as transitions
from imagegate.app.state.tasks import ENDED

images, tasks = Image.__table__, Task.__table__


@dataclass(frozen=True)
class Purged:
    tasks: int = 0  # tasks marked expired
    images: int = 0  # image rows deleted (their bytes with them)


@dataclass
class ImageRecords:
    engine: Engine
    store: ImageStore

    def delete_for_tasks(self, task_ids: list[uuid.UUID]) -> int:
        """Delete every image of these tasks (bytes and rows), whatever their status; the tasks stay.
        Returns how many images were deleted. Safe to repeat, and to run twice at once."""
        return self._delete(task_ids, expire=False).images

    def expire_ended_before(self, cutoff: datetime, limit: int) -> Purged:
        """Retention: the images of at most `limit` tasks that ended before `cutoff` and still keep
        them, oldest end first (ix_tasks_finished_at_images_kept); the tasks answer `expired: true`."""
        with self.engine.connect() as connection:
            task_ids = list(
                connection.scalars(
                    select(tasks.c.id)
                    .where(
                        tasks.c.images_expired_at.is_(None),
                        tasks.c.finished_at.is_not(None),
                        tasks.c.finished_at < cutoff,
                        tasks.c.status.in_(ENDED),
                    )
                    .order_by(tasks.c.finished_at)
                    .limit(limit)
                )
            )
        return self._delete(task_ids, expire=True) if task_ids else Purged()

    def _delete(self, task_ids: list[uuid.UUID], *, expire: bool) -> Purged:
        if not task_ids:
            return Purged()
        if not self.store.in_rows:
            with self.engine.connect() as connection:
                keys = list(
                    connection.scalars(
                        select(images.c.store_key).where(
                            images.c.task_id.in_(task_ids), images.c.store_key.is_not(None)
                        )
                    )
                )
            if keys:
                self.store.delete(keys)
        with self.engine.begin() as connection:
            deleted = connection.execute(delete(images).where(images.c.task_id.in_(task_ids))).rowcount
            marked = transitions.mark_images_expired(connection, task_ids, utcnow()) if expire else 0
        return Purged(marked, deleted)
