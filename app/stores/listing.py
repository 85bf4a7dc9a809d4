"""A key's tasks, newest first, a page at a time (GET /v1/images): three statements per page (the
tasks, their images' ids, their attempts), whatever its size; image bytes are never read."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, and_, or_, select

from imagegate.app.models import Attempt, Image, Task
from imagegate.app.state.tasks import TaskStatus
from imagegate.app.stores.tasks import StoredImage, TaskRecord

TASKS, ATTEMPTS = Task.__table__, Attempt.__table__


@dataclass(frozen=True)
class ListFilter:
    api_key_id: uuid.UUID
    status: str | None = None
    model: str | None = None
    batch_id: uuid.UUID | None = None
    created_after: datetime | None = None  # at or after


@dataclass(frozen=True)
class TaskPage:
    records: list[TaskRecord]
    has_more: bool


class UnknownCursor(LookupError):
    """`after` names no task of this key."""


def list_tasks(engine: Engine, filters: ListFilter, *, limit: int, after: uuid.UUID | None = None) -> TaskPage:
    """The key's tasks matching `filters`, newest first (created_at, then id), the `limit` after the
    task `after` (UnknownCursor if it is not one of the key's). Served by the
    (api_key_id, created_at, id) index."""
    query = select(TASKS).where(TASKS.c.api_key_id == filters.api_key_id)
    for column, value in ((TASKS.c.status, filters.status), (TASKS.c.model, filters.model)):
        if value is not None:
            query = query.where(column == value)
    if filters.batch_id is not None:
        query = query.where(TASKS.c.batch_id == filters.batch_id)
    if filters.created_after is not None:
        query = query.where(TASKS.c.created_at >= filters.created_after)
    with engine.connect() as connection:
        if after is not None:
            cursor = connection.execute(
                select(TASKS.c.created_at, TASKS.c.id).where(
                    TASKS.c.id == after, TASKS.c.api_key_id == filters.api_key_id
                )
            ).one_or_none()
            if cursor is None:
                raise UnknownCursor(after)
            # Strictly older in (created_at, id) order; no row-value comparison, so SQLite too.
            query = query.where(
                or_(
                    TASKS.c.created_at < cursor.created_at,
                    and_(TASKS.c.created_at == cursor.created_at, TASKS.c.id < cursor.id),
                )
            )
        rows = connection.execute(query.order_by(TASKS.c.created_at.desc(), TASKS.c.id.desc()).limit(limit + 1)).all()
        rows, has_more = rows[:limit], len(rows) > limit
        ids = [row.id for row in rows]
        images: dict[uuid.UUID, list[StoredImage]] = {task_id: [] for task_id in ids}
        succeeded = [row.id for row in rows if row.status == TaskStatus.SUCCEED]
        if succeeded:
            for image in connection.execute(
                select(Image.task_id, Image.id, Image.index, Image.content_type, Image.revised_prompt)
                .where(Image.task_id.in_(succeeded))
                .order_by(Image.task_id, Image.slot, Image.index)
            ):
                images[image.task_id].append(
                    StoredImage(image.id, image.index, image.content_type, image.revised_prompt, None)
                )
        attempts: dict[uuid.UUID, list] = {task_id: [] for task_id in ids}
        if ids:
            for attempt in connection.execute(
                select(ATTEMPTS)
                .where(ATTEMPTS.c.task_id.in_(ids))
                .order_by(ATTEMPTS.c.task_id, ATTEMPTS.c.number, ATTEMPTS.c.slot)
            ):
                attempts[attempt.task_id].append(attempt)
    return TaskPage([TaskRecord(row, images[row.id], attempts[row.id]) for row in rows], has_more)  # type: ignore[arg-type]
