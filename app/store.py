"""Task state transitions. Each one is a single guarded UPDATE, never read-then-write.

The guard `status = 'pending' AND attempts = attempt - 1` on a claim is what makes a duplicate
Celery delivery a no-op: only one delivery of attempt N can move the task to running, and every
later write checks that it still owns attempt N.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.models import Attempt, Image, Task, utcnow
from app.states import TaskStatus


@dataclass(frozen=True)
class Claim:
    """What a worker needs to make attempt `attempt` of a task it now owns."""

    task_id: uuid.UUID
    attempt: int
    model: str
    request: dict[str, Any]
    max_retries: int


@dataclass(frozen=True)
class Failure:
    code: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)
    upstream_status: int | None = None


@dataclass(frozen=True)
class NewImage:
    data: bytes
    content_type: str
    revised_prompt: str | None = None


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


def parse_task_id(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except (ValueError, TypeError, AttributeError):
        return None


class TaskStore:
    def __init__(self, sessions: sessionmaker[Session]):
        self._sessions = sessions

    # -- intake -----------------------------------------------------------------------------
    def create(self, *, api_key_id: uuid.UUID, model: str, request: dict[str, Any],
               response_format: str, max_retries: int) -> Task:
        task = Task(id=uuid.uuid4(), api_key_id=api_key_id, model=model, request=request,
                    response_format=response_format, max_retries=max_retries,
                    status=TaskStatus.PENDING, attempts=0, created_at=utcnow())
        with self._sessions.begin() as session:
            session.add(task)
        return task

    def get(self, task_id: uuid.UUID, *, api_key_id: uuid.UUID | None = None,
            with_bytes: bool = False) -> TaskRecord | None:
        with self._sessions() as session:
            query = select(Task).where(Task.id == task_id)
            if api_key_id is not None:
                query = query.where(Task.api_key_id == api_key_id)
            task = session.scalars(query).one_or_none()
            if task is None:
                return None
            images: list[StoredImage] = []
            if task.status == TaskStatus.SUCCEED:
                columns = [Image.id, Image.index, Image.content_type, Image.revised_prompt]
                if with_bytes:
                    columns.append(Image.data)
                rows = session.execute(select(*columns).where(Image.task_id == task_id).order_by(Image.index))
                images = [StoredImage(row.id, row.index, row.content_type, row.revised_prompt,
                                      row.data if with_bytes else None) for row in rows]
            return TaskRecord(task, images)

    def image(self, image_id: uuid.UUID) -> tuple[str, bytes] | None:
        with self._sessions() as session:
            row = session.execute(select(Image.content_type, Image.data).where(Image.id == image_id)).one_or_none()
            return (row.content_type, row.data) if row else None

    # -- worker transitions -----------------------------------------------------------------
    def claim(self, task_id: uuid.UUID, attempt: int, *, worker: str) -> Claim | None:
        now = utcnow()
        with self._sessions.begin() as session:
            row = session.execute(
                update(Task)
                .where(Task.id == task_id, Task.status == TaskStatus.PENDING, Task.attempts == attempt - 1)
                .values(status=TaskStatus.RUNNING, attempts=attempt, worker=worker, started_at=now)
                .returning(Task.model, Task.request, Task.max_retries)
                .execution_options(synchronize_session=False)
            ).one_or_none()
            if row is None:
                return None
            session.execute(insert(Attempt).values(task_id=task_id, number=attempt, worker=worker, started_at=now))
        return Claim(task_id, attempt, row.model, row.request, row.max_retries)

    def succeed(self, claim: Claim, images: list[NewImage], usage: dict[str, Any] | None,
                upstream_status: int | None = None) -> bool:
        with self._sessions.begin() as session:
            if not self._end(session, claim, TaskStatus.SUCCEED, usage=usage):
                return False
            self._end_attempt(session, claim, upstream_status=upstream_status)
            session.execute(insert(Image), [
                {"id": uuid.uuid4(), "task_id": claim.task_id, "index": index, "content_type": image.content_type,
                 "data": image.data, "revised_prompt": image.revised_prompt, "created_at": utcnow()}
                for index, image in enumerate(images)
            ])
        return True

    def fail(self, claim: Claim, failure: Failure) -> bool:
        return self._end_with(claim, TaskStatus.FAILED, failure)

    def retry_later(self, claim: Claim, failure: Failure) -> bool:
        """Hand a failed attempt back to the queue: running -> pending, keeping the attempt count."""
        return self._end_with(claim, TaskStatus.PENDING, failure)

    def _end_with(self, claim: Claim, status: TaskStatus, failure: Failure) -> bool:
        with self._sessions.begin() as session:
            if not self._end(session, claim, status, error_code=failure.code, error_message=failure.message,
                             error_details=failure.details or None):
                return False
            self._end_attempt(session, claim, failure)
        return True

    @staticmethod
    def _end(session: Session, claim: Claim, status: TaskStatus, **values: Any) -> bool:
        if status.finished:
            values["finished_at"] = utcnow()
        result = session.execute(
            update(Task)
            .where(Task.id == claim.task_id, Task.status == TaskStatus.RUNNING, Task.attempts == claim.attempt)
            .values(status=status, worker=None, **values)
            .execution_options(synchronize_session=False)
        )
        return result.rowcount == 1

    @staticmethod
    def _end_attempt(session: Session, claim: Claim, failure: Failure | None = None,
                     upstream_status: int | None = None) -> None:
        session.execute(
            update(Attempt)
            .where(Attempt.task_id == claim.task_id, Attempt.number == claim.attempt)
            .values(ended_at=utcnow(),
                    upstream_status=failure.upstream_status if failure else upstream_status,
                    error_code=failure.code if failure else None,
                    error_message=failure.message if failure else None)
            .execution_options(synchronize_session=False)
        )
