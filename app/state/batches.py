"""The batch machine:

    (intake) -> in_progress -> completed            (when its last task ends)
                in_progress -> cancelling -> cancelled

Cancelling a batch cancels its tasks (app.state.tasks.cancel_batch_tasks); it is cancelled, not
completed, once the last of them ends.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, Row, case, insert, select, update

from imagegate.app.models import Batch, Task
from imagegate.app.state.refused import Outcome, Refused
from imagegate.app.state.tasks import UNFINISHED


class BatchStatus(StrEnum):
    IN_PROGRESS = "in_progress"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


OPEN = (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING)

batches, tasks = Batch.__table__, Task.__table__


def accept(
    connection: Connection,
    *,
    api_key_id: uuid.UUID,
    total: int,
    callback_url: str | None,
    metadata: dict[str, Any] | None,
    now: datetime,
    batch_id: uuid.UUID,
) -> Row:
    """(none) -> in_progress; the new row (with the Batch's attribute names)."""
    return connection.execute(
        insert(batches)
        .values(
            id=batch_id,
            api_key_id=api_key_id,
            status=BatchStatus.IN_PROGRESS,
            total=total,
            callback_url=callback_url,
            meta=metadata,
            created_at=now,
        )
        .returning(batches)
    ).one()


def cancel(connection: Connection, batch_id: uuid.UUID, api_key_id: uuid.UUID) -> Outcome:
    """in_progress -> cancelling (and cancelling again, harmlessly: its tasks' cancel is idempotent)."""
    if connection.execute(
        update(batches)
        .where(batches.c.id == batch_id, batches.c.api_key_id == api_key_id, batches.c.status.in_(OPEN))
        .values(status=BatchStatus.CANCELLING)
    ).rowcount:
        return True
    return _why_refused(connection, batch_id, api_key_id)


def complete(connection: Connection, batch_id: uuid.UUID, now: datetime) -> bool:
    """in_progress -> completed, cancelling -> cancelled, once none of its tasks is unfinished.
    Whether it closed, without why not: it runs as a batch's tasks end, nearly always refused
    (tasks still running), and its callers need only to know whether to announce the end."""
    unfinished = select(tasks.c.id).where(tasks.c.batch_id == batch_id, tasks.c.status.in_(UNFINISHED)).exists()
    ended = case((batches.c.status == BatchStatus.CANCELLING, BatchStatus.CANCELLED), else_=BatchStatus.COMPLETED)
    closed = connection.execute(
        update(batches)
        .where(batches.c.id == batch_id, batches.c.status.in_(OPEN), ~unfinished)
        .values(status=ended, finished_at=now)
    ).rowcount
    return closed == 1


def _why_refused(connection: Connection, batch_id: uuid.UUID, api_key_id: uuid.UUID | None = None) -> Refused:
    row = connection.execute(
        select(batches.c.api_key_id, batches.c.status).where(batches.c.id == batch_id)
    ).one_or_none()
    if row is None:
        return Refused.NOT_FOUND
    if api_key_id is not None and row.api_key_id != api_key_id:
        return Refused.NOT_OWNER
    return Refused.ALREADY_ENDED
