"""The task machine, as intake, cancel and the sweeper drive it (the worker's side is in
app.state.attempts):

    (intake) -> pending -> running -> succeed | failed
                pending <- running              (a retry, or a lost worker's attempt taken back)
                pending | running -> failed     (cancelled, deadline exceeded, attempts exhausted)

A running task the client cancels keeps running with `cancel_requested` set, and its worker ends it
`cancelled` before its next upstream call or store. Each transition is one guarded UPDATE.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Row,
    and_,
    bindparam,
    case,
    insert,
    select,
    text,
    update,
)

from imagegate.app.failures import CANCELLED, ErrorCode, Failure
from imagegate.app.models import Task, utcnow
from imagegate.app.state.refused import Refused


class TaskStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEED = "succeed"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in ENDED


class QueuedReason(StrEnum):
    """Why a pending task is not running yet, when it is waiting on purpose (`queued_reason`; a
    CHECK constraint): its model's upstream limits (app/providers.py) had no room for its calls."""

    MODEL_CONCURRENCY_LIMIT = "model_concurrency_limit"  # the model's max_concurrency calls are in flight
    MODEL_RATE_LIMIT = "model_rate_limit"  # its rpm is spent for now, or a 429 paused or slowed it


UNFINISHED = (TaskStatus.PENDING, TaskStatus.RUNNING)
ENDED = (TaskStatus.SUCCEED, TaskStatus.FAILED)

tasks = Task.__table__
# Built once: a prepared Core statement skips the per-call compile cache key (intake's hot path).
_ACCEPT = insert(tasks)
# Many rows in one statement. On Postgres, one array per column (unnest): the statement's text is
# the same for any number of rows, so psycopg and Postgres parse and plan it once; a multi-row
# VALUES list is a new, long text for each group size, which psycopg parses anew every time.
# Elsewhere (SQLite), SQLAlchemy's multi-row VALUES ("insertmanyvalues", which needs RETURNING).
_ACCEPT_MANY = insert(tasks).returning(tasks.c.id)
_UNNESTED = {
    "id": "uuid",
    "api_key_id": "uuid",
    "model": "text",
    "route": "text",
    "request": "jsonb",
    "response_format": "text",
    "callback_url": "text",
    "batch_id": "uuid",
    "batch_line": "integer",
    "custom_id": "text",
    "created_at": "timestamptz",
    "run_after": "timestamptz",
}
_CONSTANT = {"status": TaskStatus.PENDING, "attempts": 0, "retries_used": 0, "polls": 0, "cancel_requested": False}
_CONSTANT_SQL = "'pending', 0, 0, 0, false"
_ACCEPT_UNNESTED = text(
    f"INSERT INTO tasks ({', '.join([*_UNNESTED, *_CONSTANT])}) "
    f"SELECT {', '.join(_UNNESTED)}, {_CONSTANT_SQL} "
    f"FROM unnest({', '.join(f'CAST(:{name} AS {kind}[])' for name, kind in _UNNESTED.items())}) "
    f"AS accepted({', '.join(_UNNESTED)})"
)
_OWNER_AND_STATUS = select(tasks.c.api_key_id, tasks.c.status).where(tasks.c.id == bindparam("id"))
_REQUEUED = (tasks.c.id, tasks.c.attempts, tasks.c.batch_id)


class CancelOutcome(StrEnum):
    ENDED = "ended"  # was pending: failed `cancelled` now
    REQUESTED = "requested"  # is running: its worker stops before its next upstream call or store


# -- intake ------------------------------------------------------------------------------------
def new_task(
    *,
    api_key_id: uuid.UUID,
    model: str,
    request: dict[str, Any],
    response_format: str,
    callback_url: str | None,
    now: datetime,
    task_id: uuid.UUID | None = None,
    batch_id: uuid.UUID | None = None,
    batch_line: int | None = None,
    custom_id: str | None = None,
) -> dict[str, Any]:
    """The row of a task just accepted, for `accept`."""
    return {
        "id": task_id or uuid.uuid4(),
        "api_key_id": api_key_id,
        "model": model,
        "request": request,
        "response_format": response_format,
        "status": TaskStatus.PENDING,
        "attempts": 0,
        "route": model,
        "retries_used": 0,
        "polls": 0,
        "cancel_requested": False,
        "callback_url": callback_url,
        "batch_id": batch_id,
        "batch_line": batch_line,
        "custom_id": custom_id,
        "created_at": now,
        "run_after": now,
    }


def accept(connection: Connection, row: dict[str, Any]) -> None:
    """(none) -> pending: one INSERT for one task."""
    connection.execute(_ACCEPT, row)


def accept_many(connection: Connection, rows: list[dict[str, Any]]) -> None:
    """(none) -> pending for many new_task rows (concurrent submits, a batch's lines), in one INSERT
    statement."""
    if len(rows) == 1:  # alone: binding a row as one-element arrays cost the API ~0.3 ms more
        connection.execute(_ACCEPT, rows[0])
        return
    if connection.dialect.name != "postgresql":
        connection.execute(_ACCEPT_MANY, rows).all()
        return
    assert all(row[name] == value for row in rows for name, value in _CONSTANT.items()), "not new tasks"
    columns: dict[str, Any] = {name: [row[name] for row in rows] for name in _UNNESTED}
    columns["request"] = [json.dumps(request) for request in columns["request"]]
    connection.execute(_ACCEPT_UNNESTED, columns)


# -- cancel ------------------------------------------------------------------------------------
def _cancel(*guard: ColumnElement[bool]):
    """pending -> failed `cancelled`, and running -> running with cancel_requested, in one statement:
    the CASEs read the row the guard passed, so a task moving between the two meanwhile is never missed."""
    pending = tasks.c.status == TaskStatus.PENDING

    def if_pending(value: Any, column) -> Any:
        return case((pending, value), else_=column)

    failed = {column: if_pending(value, tasks.c[column]) for column, value in CANCELLED.columns().items()}
    failed["finished_at"] = if_pending(utcnow(), tasks.c.finished_at)
    return (
        update(tasks)
        .where(*guard, tasks.c.status.in_(UNFINISHED))
        .values(status=if_pending(TaskStatus.FAILED, tasks.c.status), cancel_requested=True, **failed)
        .returning(tasks.c.id, tasks.c.status)
    )


def cancel(connection: Connection, task_id: uuid.UUID, api_key_id: uuid.UUID) -> CancelOutcome | Refused:
    row = connection.execute(_cancel(tasks.c.id == task_id, tasks.c.api_key_id == api_key_id)).one_or_none()
    if row is not None:
        return CancelOutcome.ENDED if row.status == TaskStatus.FAILED else CancelOutcome.REQUESTED
    found = connection.execute(_OWNER_AND_STATUS, {"id": task_id}).one_or_none()
    if found is None:
        return Refused.NOT_FOUND
    return Refused.NOT_OWNER if found.api_key_id != api_key_id else Refused.ALREADY_ENDED


def cancel_batch_tasks(connection: Connection, batch_id: uuid.UUID) -> list[uuid.UUID]:
    """`cancel` for every unfinished task of the batch; the ids of those that ended now."""
    rows = connection.execute(_cancel(tasks.c.batch_id == batch_id))
    return [row.id for row in rows if row.status == TaskStatus.FAILED]


# -- the sweeper -------------------------------------------------------------------------------
def fail_overdue(connection: Connection, created_before: datetime, failure: Failure) -> list[uuid.UUID]:
    """pending | running -> failed, for tasks accepted before `created_before`."""
    return list(
        connection.scalars(
            update(tasks)
            .where(tasks.c.status.in_(UNFINISHED), tasks.c.created_at < created_before)
            .values(
                status=TaskStatus.FAILED, worker=None, lease_expires_at=None, finished_at=utcnow(), **failure.columns()
            )
            .returning(tasks.c.id)
        )
    )


def _expired(now: datetime) -> list[ColumnElement[bool]]:
    return [tasks.c.status == TaskStatus.RUNNING, tasks.c.lease_expires_at < now]


def fail_expired(connection: Connection, now: datetime, max_attempts: int) -> list[uuid.UUID]:
    """running -> failed, for expired attempts that were cancelled or were the last allowed."""
    code = case((tasks.c.cancel_requested.is_(True), ErrorCode.CANCELLED), else_=ErrorCode.ATTEMPTS_EXHAUSTED)
    return list(
        connection.scalars(
            update(tasks)
            .where(*_expired(now), (tasks.c.attempts >= max_attempts) | tasks.c.cancel_requested)
            .values(
                status=TaskStatus.FAILED,
                worker=None,
                lease_expires_at=None,
                finished_at=now,
                error_code=code,
                error_message=f"Ended after {max_attempts} attempts or by cancellation.",
                error_details=None,
            )
            .returning(tasks.c.id)
        )
    )


def requeue_expired(connection: Connection, now: datetime, failure: Failure) -> list[Row]:
    """running -> pending, for expired attempts (their worker is dead, frozen or gone): (id, attempts,
    batch_id) of each, to publish its next attempt."""
    return list(
        connection.execute(
            update(tasks)
            .where(*_expired(now))
            .values(status=TaskStatus.PENDING, worker=None, lease_expires_at=None, run_after=now, **failure.columns())
            .returning(*_REQUEUED)
        )
    )


def is_overdue_pending(due_before: datetime) -> ColumnElement[bool]:
    """A pending task due since before `due_before` that no worker took: its message may be lost."""
    return and_(tasks.c.status == TaskStatus.PENDING, tasks.c.run_after < due_before)


def republish_overdue(
    connection: Connection, due_before: datetime, *where: ColumnElement[bool], limit: int | None = None
) -> list[Row]:
    """pending -> pending, due now: overdue tasks (the `limit` oldest, if given) about to be published
    again; bumping run_after keeps a second sweeper from publishing them too. (id, attempts, batch_id)."""
    overdue = [is_overdue_pending(due_before), *where]
    if limit is not None:
        oldest = select(tasks.c.id).where(*overdue).order_by(tasks.c.run_after).limit(limit)
        overdue.append(tasks.c.id.in_(oldest.scalar_subquery()))
    return list(connection.execute(update(tasks).where(*overdue).values(run_after=utcnow()).returning(*_REQUEUED)))


# -- deletion ----------------------------------------------------------------------------------
def mark_deleted(connection: Connection, task_id: uuid.UUID, request: dict[str, Any]) -> bool:
    """any status -> the same status, deleted: the request is replaced by `request` (what is kept of
    it) and the upstream's error details (which may quote the prompt) dropped; status, timestamps,
    usage and the error code stay. False when it was deleted already."""
    return (
        connection.execute(
            update(tasks)
            .where(tasks.c.id == task_id, tasks.c.deleted.is_(False))
            .values(deleted=True, request=request, error_details=None)
        ).rowcount
        > 0
    )


def mark_images_expired(connection: Connection, task_ids: list[uuid.UUID], now: datetime) -> int:
    """An ended task's images were deleted for retention: it answers `expired: true` from now on.
    Not a status change; guarded so a task is marked once, and only once it has ended."""
    return connection.execute(
        update(tasks)
        .where(tasks.c.id.in_(task_ids), tasks.c.status.in_(ENDED), tasks.c.images_expired_at.is_(None))
        .values(images_expired_at=now)
    ).rowcount
