"""Task transitions of intake, cancel and the sweeper, and reading tasks. Each transition is a single
guarded UPDATE, never read-then-write. The worker's transitions are in app.attempt_store.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, Engine, bindparam, case, delete, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.idempotency import reserve
from app.models import Attempt, IdempotencyKey, Image, Task, utcnow
from app.states import ErrorCode, TaskStatus
from app.webhook_events import enqueue_task_events

UNFINISHED = (TaskStatus.PENDING, TaskStatus.RUNNING)
ENDED = (TaskStatus.SUCCEED, TaskStatus.FAILED)
TASK_TABLE, ATTEMPT_TABLE = Task.__table__, Attempt.__table__
# Built once: a prepared Core statement skips the ORM and the per-call compile cache key.
_INSERT_TASK = insert(TASK_TABLE)
_TASK = select(TASK_TABLE).where(TASK_TABLE.c.id == bindparam("id"))
_TASK_OF_KEY = _TASK.where(TASK_TABLE.c.api_key_id == bindparam("api_key_id"))
_TASK_STATUS = select(TASK_TABLE.c.status).where(TASK_TABLE.c.id == bindparam("id"))
_TASK_CREATED = select(TASK_TABLE.c.id, TASK_TABLE.c.created_at).where(TASK_TABLE.c.id == bindparam("id"))


@dataclass(frozen=True)
class Failure:
    code: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)
    upstream_status: int | None = None


CANCELLED = Failure(ErrorCode.CANCELLED, "The task was cancelled.")


@dataclass(frozen=True)
class StoredImage:
    id: uuid.UUID
    index: int
    content_type: str
    revised_prompt: str | None
    data: bytes | None  # loaded only when the caller asked for bytes


@dataclass(frozen=True)
class TaskRecord:
    task: Task
    images: list[StoredImage]
    attempts: list[Attempt] = field(default_factory=list)


class NewTask(NamedTuple):
    """What intake needs of a task it accepted (or replayed)."""

    id: uuid.UUID
    created_at: datetime


class Requeued(NamedTuple):
    """A task to publish again: attempt `attempt` of it, on its batch's queue if it has one."""

    task_id: uuid.UUID
    attempt: int
    batch_id: uuid.UUID | None


class CancelResult(StrEnum):
    CANCELLED = "cancelled"     # was pending: failed `cancelled` now
    REQUESTED = "requested"     # is running: stops before its next upstream call or store
    FINISHED = "finished"       # already ended: nothing to cancel
    MISSING = "missing"


def parse_task_id(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except (ValueError, TypeError, AttributeError):
        return None


def _after(seconds: float) -> datetime:
    return utcnow() + timedelta(seconds=seconds)


class TaskStore:
    def __init__(self, sessions: sessionmaker[Session]):
        self._sessions = sessions
        self._engine: Engine = sessions.kw["bind"]  # intake and reads use Core connections, no Session

    # -- intake and reading ------------------------------------------------------------------
    def create(self, *, api_key_id: uuid.UUID, model: str, request: dict[str, Any], response_format: str,
               callback_url: str | None = None, idempotency: tuple[str, str] | None = None) -> tuple[NewTask, bool]:
        """The new task, True; or, when the Idempotency-Key (key, fingerprint) was used before with
        the same request, that earlier task, False. One transaction, Core statements (no ORM unit of
        work): this is the hot path of every submit."""
        now, task_id = utcnow(), uuid.uuid4()
        with self._engine.begin() as connection:
            if idempotency is not None:
                earlier = reserve(connection, api_key_id, *idempotency, task_id=task_id)
                if earlier is not None:
                    row = connection.execute(_TASK_CREATED, {"id": earlier.task_id}).one()
                    return NewTask(row.id, row.created_at), False
            connection.execute(_INSERT_TASK, {
                "id": task_id, "api_key_id": api_key_id, "model": model, "request": request,
                "response_format": response_format, "status": TaskStatus.PENDING, "attempts": 0, "route": model,
                "retries_used": 0, "polls": 0, "cancel_requested": False, "created_at": now, "run_after": now,
                "callback_url": callback_url})
        return NewTask(task_id, now), True

    def get(self, task_id: uuid.UUID, *, api_key_id: uuid.UUID | None = None, with_bytes: bool = False,
            with_attempts: bool = True) -> TaskRecord | None:
        """The task (a Core row with the Task's attribute names: no ORM identity map on the read path),
        its images, and its attempt log unless with_attempts=False (a synchronous reply needs none)."""
        with self._engine.connect() as session:
            query = _TASK if api_key_id is None else _TASK_OF_KEY
            task = session.execute(query, {"id": task_id, "api_key_id": api_key_id}).one_or_none()
            if task is None:
                return None
            images: list[StoredImage] = []
            if task.status == TaskStatus.SUCCEED:
                columns = [Image.id, Image.index, Image.content_type, Image.revised_prompt]
                if with_bytes:
                    columns.append(Image.data)
                rows = session.execute(select(*columns).where(Image.task_id == task_id)
                                       .order_by(Image.slot, Image.index))
                images = [StoredImage(row.id, row.index, row.content_type, row.revised_prompt,
                                      row.data if with_bytes else None) for row in rows]
            attempts = list(session.execute(select(ATTEMPT_TABLE).where(ATTEMPT_TABLE.c.task_id == task_id)
                                            .order_by(ATTEMPT_TABLE.c.number, ATTEMPT_TABLE.c.slot))
                            ) if with_attempts else []
            return TaskRecord(task, images, attempts)  # type: ignore[arg-type]

    def status(self, task_id: uuid.UUID) -> str | None:
        """The task's status alone: the cheap re-read of a waiting synchronous request."""
        with self._engine.connect() as session:
            return session.execute(_TASK_STATUS, {"id": task_id}).scalar_one_or_none()

    def image(self, image_id: uuid.UUID) -> tuple[str, bytes] | None:
        with self._sessions() as session:
            row = session.execute(select(Image.content_type, Image.data).where(Image.id == image_id)).one_or_none()
            return (row.content_type, row.data) if row else None

    def cancel(self, task_id: uuid.UUID, api_key_id: uuid.UUID) -> CancelResult:
        mine = [Task.id == task_id, Task.api_key_id == api_key_id]
        with self._sessions.begin() as session:
            if _update(session, [*mine, Task.status == TaskStatus.PENDING], status=TaskStatus.FAILED,
                       finished_at=utcnow(), **error_values(CANCELLED)):
                enqueue_task_events(session, [task_id])
                return CancelResult.CANCELLED
            if _update(session, [*mine, Task.status == TaskStatus.RUNNING], cancel_requested=True):
                return CancelResult.REQUESTED
            found = session.scalar(select(Task.id).where(*mine))
        return CancelResult.FINISHED if found else CancelResult.MISSING

    # -- the sweeper -------------------------------------------------------------------------
    def fail_overdue(self, deadline_s: float) -> list[uuid.UUID]:
        """Tasks not ended `deadline_s` after they were accepted fail `deadline_exceeded`."""
        failure = Failure(ErrorCode.DEADLINE_EXCEEDED, f"The task did not end within {deadline_s:g} s.")
        with self._sessions.begin() as session:
            ids = _update_returning(session, [Task.status.in_(UNFINISHED), Task.created_at < _after(-deadline_s)],
                                    status=TaskStatus.FAILED, worker=None, lease_expires_at=None,
                                    finished_at=utcnow(), **error_values(failure))
            _close_open_attempts(session, ids, failure)
            enqueue_task_events(session, ids)
        return ids

    def take_back_expired(self, max_attempts: int) -> tuple[list[Requeued], list[uuid.UUID]]:
        """Running attempts whose lease expired: their worker is dead, frozen or gone. Each goes back to
        pending (returned with its next attempt number), or fails when it was cancelled or has used
        its attempts. Returns (requeued, failed)."""
        lost = Failure(ErrorCode.WORKER_LOST, "The worker running this attempt stopped renewing its lease.")
        expired = [Task.status == TaskStatus.RUNNING, Task.lease_expires_at < utcnow()]
        with self._sessions.begin() as session:
            code = case((Task.cancel_requested.is_(True), ErrorCode.CANCELLED), else_=ErrorCode.ATTEMPTS_EXHAUSTED)
            failed = _update_returning(session, [*expired, (Task.attempts >= max_attempts) | Task.cancel_requested],
                                       status=TaskStatus.FAILED, worker=None, lease_expires_at=None,
                                       finished_at=utcnow(), error_code=code,
                                       error_message=f"Ended after {max_attempts} attempts or by cancellation.",
                                       error_details=None)
            rows = session.execute(
                update(Task).where(*expired).values(status=TaskStatus.PENDING, worker=None, lease_expires_at=None,
                                                    run_after=utcnow(), **error_values(lost))
                .returning(Task.id, Task.attempts, Task.batch_id).execution_options(synchronize_session=False)
            ).all()
            requeued = [Requeued(row.id, row.attempts + 1, row.batch_id) for row in rows]
            _close_open_attempts(session, failed + [item.task_id for item in requeued], lost)
            enqueue_task_events(session, failed)
        return requeued, failed

    def overdue_pending(self, republish_after_s: float) -> list[Requeued]:
        """Pending tasks due for `republish_after_s` with no worker taking them: their message was
        lost (never published, or a flushed broker). Bumps run_after so one sweeper republishes."""
        with self._sessions.begin() as session:
            rows = session.execute(
                update(Task)
                .where(Task.status == TaskStatus.PENDING, Task.run_after < _after(-republish_after_s))
                .values(run_after=utcnow())
                .returning(Task.id, Task.attempts, Task.batch_id).execution_options(synchronize_session=False)
            ).all()
        return [Requeued(row.id, row.attempts + 1, row.batch_id) for row in rows]

    def batch_of(self, task_ids: list[uuid.UUID]) -> dict[uuid.UUID, uuid.UUID | None]:
        with self._sessions() as session:
            return dict(session.execute(select(Task.id, Task.batch_id).where(Task.id.in_(task_ids))).all())

    def forget_idempotency_keys(self, ttl_s: float) -> int:
        with self._sessions.begin() as session:
            return session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < _after(-ttl_s))).rowcount


def _update(session: Session, guard: list[ColumnElement[bool]], **values: Any) -> bool:
    result = session.execute(update(Task).where(*guard).values(**values).execution_options(synchronize_session=False))
    return result.rowcount > 0


def _update_returning(session: Session, guard: list[ColumnElement[bool]], **values: Any) -> list[uuid.UUID]:
    return list(session.scalars(update(Task).where(*guard).values(**values).returning(Task.id)
                                .execution_options(synchronize_session=False)))


def _close_open_attempts(session: Session, task_ids: list[uuid.UUID], failure: Failure) -> None:
    if task_ids:
        session.execute(update(Attempt).where(Attempt.task_id.in_(task_ids), Attempt.ended_at.is_(None))
                        .values(ended_at=utcnow(), error_code=failure.code, error_message=failure.message)
                        .execution_options(synchronize_session=False))


def error_values(failure: Failure) -> dict[str, Any]:
    return {"error_code": failure.code, "error_message": failure.message, "error_details": failure.details or None}
