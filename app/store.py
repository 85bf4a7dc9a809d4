"""Task state transitions. Each one is a single guarded UPDATE, never read-then-write.

The guard `status = 'pending' AND attempts = attempt - 1` on a claim is what makes a duplicate
Celery delivery a no-op: only one delivery of attempt N can move the task to running, and every
later write checks that it still owns attempt N.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
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
    route: str
    route_started: int
    request: dict[str, Any]
    usage: dict[str, Any] | None
    upstream_task_id: str | None
    started_at: datetime
    polls: int


CLAIM_COLUMNS = (Task.id, Task.attempts, Task.model, Task.route, Task.route_started, Task.request, Task.usage,
                 Task.upstream_task_id, Task.started_at, Task.polls)


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
    slot: int = 0


@dataclass(frozen=True)
class CallOutcome:
    """How one upstream call of an attempt ended (failure None: it gave its images)."""

    slot: int
    upstream_status: int | None = None
    failure: Failure | None = None


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


def parse_task_id(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except (ValueError, TypeError, AttributeError):
        return None


class TaskStore:
    def __init__(self, sessions: sessionmaker[Session]):
        self._sessions = sessions

    # -- intake -----------------------------------------------------------------------------
    def create(self, *, api_key_id: uuid.UUID, model: str, request: dict[str, Any], response_format: str) -> Task:
        task = Task(id=uuid.uuid4(), api_key_id=api_key_id, model=model, request=request,
                    response_format=response_format, status=TaskStatus.PENDING, attempts=0, route=model,
                    route_started=1, polls=0, created_at=utcnow())
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
                rows = session.execute(select(*columns).where(Image.task_id == task_id)
                                       .order_by(Image.slot, Image.index))
                images = [StoredImage(row.id, row.index, row.content_type, row.revised_prompt,
                                      row.data if with_bytes else None) for row in rows]
            attempts = list(session.scalars(select(Attempt).where(Attempt.task_id == task_id)
                                            .order_by(Attempt.number, Attempt.slot)))
            return TaskRecord(task, images, attempts)

    def image(self, image_id: uuid.UUID) -> tuple[str, bytes] | None:
        with self._sessions() as session:
            row = session.execute(select(Image.content_type, Image.data).where(Image.id == image_id)).one_or_none()
            return (row.content_type, row.data) if row else None

    def done_slots(self, task_id: uuid.UUID) -> set[int]:
        """Fan-out slots whose images earlier attempts already stored."""
        with self._sessions() as session:
            return set(session.scalars(select(Image.slot).where(Image.task_id == task_id).distinct()))

    # -- worker transitions -----------------------------------------------------------------
    def claim(self, task_id: uuid.UUID, attempt: int, *, worker: str) -> Claim | None:
        """pending -> running for attempt `attempt`; None when another delivery got there first."""
        return self._claim_where(task_id, [Task.status == TaskStatus.PENDING, Task.attempts == attempt - 1],
                                 status=TaskStatus.RUNNING, attempts=attempt, worker=worker, started_at=utcnow(),
                                 polls=0)

    def claim_poll(self, task_id: uuid.UUID, attempt: int, poll: int) -> Claim | None:
        """Take poll step `poll` of a running attempt that is waiting on an asynchronous upstream."""
        return self._claim_where(task_id, [Task.status == TaskStatus.RUNNING, Task.attempts == attempt,
                                           Task.polls == poll - 1, Task.upstream_task_id.is_not(None)], polls=poll)

    def _claim_where(self, task_id: uuid.UUID, guard: list, **values: Any) -> Claim | None:
        with self._sessions.begin() as session:
            row = session.execute(
                update(Task).where(Task.id == task_id, *guard).values(**values).returning(*CLAIM_COLUMNS)
                .execution_options(synchronize_session=False)
            ).one_or_none()
        if row is None:
            return None
        return Claim(row.id, row.attempts, row.model, row.route, row.route_started, row.request, row.usage,
                     row.upstream_task_id, row.started_at, row.polls)

    def begin_calls(self, claim: Claim, slots: list[int], *, worker: str) -> bool:
        """Record the calls about to be made, while the attempt is still ours."""
        with self._sessions.begin() as session:
            if not self._owned(session, claim):
                return False
            session.execute(insert(Attempt), [
                {"task_id": claim.task_id, "number": claim.attempt, "slot": slot, "model": claim.route,
                 "worker": worker, "started_at": utcnow()} for slot in slots
            ])
        return True

    def record_upstream_task(self, claim: Claim, upstream_task_id: str) -> bool:
        with self._sessions.begin() as session:
            return self._owned(session, claim, upstream_task_id=upstream_task_id, polls=0)

    def succeed(self, claim: Claim, images: list[NewImage], usage: dict[str, Any] | None,
                outcomes: list[CallOutcome]) -> bool:
        return self._end(claim, TaskStatus.SUCCEED, images, outcomes, usage=usage)

    def fail(self, claim: Claim, failure: Failure, outcomes: list[CallOutcome]) -> bool:
        return self._end(claim, TaskStatus.FAILED, [], outcomes, **_error_values(failure))

    def retry_later(self, claim: Claim, failure: Failure, outcomes: list[CallOutcome], *,
                    images: list[NewImage] = (), usage: dict[str, Any] | None = None,
                    route: str | None = None) -> bool:
        """running -> pending, keeping the attempt count and the images of the calls that worked.
        With `route`, the next attempt goes to that fallback model."""
        values = _error_values(failure) | {"usage": usage, "upstream_task_id": None}
        if route is not None:
            values |= {"route": route, "route_started": claim.attempt + 1}
        return self._end(claim, TaskStatus.PENDING, images, outcomes, **values)

    def _end(self, claim: Claim, status: TaskStatus, images: list[NewImage] | tuple, outcomes: list[CallOutcome],
             **values: Any) -> bool:
        if status.finished:
            values["finished_at"] = utcnow()
        with self._sessions.begin() as session:
            if not self._owned(session, claim, status=status, worker=None, **values):
                return False
            now = utcnow()
            for outcome in outcomes:
                failure = outcome.failure
                session.execute(
                    update(Attempt)
                    .where(Attempt.task_id == claim.task_id, Attempt.number == claim.attempt,
                           Attempt.slot == outcome.slot)
                    .values(ended_at=now, upstream_status=failure.upstream_status if failure else outcome.upstream_status,
                            error_code=failure.code if failure else None,
                            error_message=failure.message if failure else None)
                    .execution_options(synchronize_session=False)
                )
            if images:
                indexes: dict[int, int] = {}
                rows = []
                for image in images:
                    index = indexes[image.slot] = indexes.get(image.slot, -1) + 1
                    rows.append({"id": uuid.uuid4(), "task_id": claim.task_id, "slot": image.slot, "index": index,
                                 "content_type": image.content_type, "data": image.data,
                                 "revised_prompt": image.revised_prompt, "created_at": now})
                session.execute(insert(Image), rows)
        return True

    @staticmethod
    def _owned(session: Session, claim: Claim, **values: Any) -> bool:
        """The fence: change the task only while attempt `claim.attempt` is still running."""
        result = session.execute(
            update(Task)
            .where(Task.id == claim.task_id, Task.status == TaskStatus.RUNNING, Task.attempts == claim.attempt)
            .values(**(values or {"attempts": claim.attempt}))
            .execution_options(synchronize_session=False)
        )
        return result.rowcount == 1


def _error_values(failure: Failure) -> dict[str, Any]:
    return {"error_code": failure.code, "error_message": failure.message, "error_details": failure.details or None}
