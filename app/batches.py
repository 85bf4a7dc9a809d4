"""Batches: many generation requests accepted at once (bulk insert), tracked together, completed
(with a webhook) when the last of their tasks ends."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, func, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.idempotency import reserve
from app.models import Batch, Image, Task, utcnow
from app.schemas import GenerationRequest
from app.states import TaskStatus
from app.store import CANCELLED, UNFINISHED, error_values
from app.webhook_events import enqueue_batch_event, enqueue_task_events


@dataclass(frozen=True)
class NewLine:
    custom_id: str
    model: str
    body: GenerationRequest
    callback_url: str | None


@dataclass(frozen=True)
class ResultRow:
    custom_id: str
    task: Task
    images: list[tuple[uuid.UUID, str, str | None]]  # (image id, content type, revised prompt)


class BatchStore:
    def __init__(self, sessions: sessionmaker[Session]):
        self._sessions = sessions

    def create(self, *, api_key_id: uuid.UUID, lines: list[NewLine], callback_url: str | None,
               metadata: dict[str, Any] | None, idempotency: tuple[str, str] | None = None
               ) -> tuple[Batch, list[uuid.UUID]]:
        """The batch and the ids of its new tasks (none when an Idempotency-Key replays an earlier batch)."""
        now, batch_id = utcnow(), uuid.uuid4()
        with self._sessions.begin() as session:
            if idempotency is not None:
                earlier = reserve(session, api_key_id, *idempotency, batch_id=batch_id)
                if earlier is not None:
                    return session.get(Batch, earlier.batch_id), []
            batch = Batch(id=batch_id, api_key_id=api_key_id, status="in_progress", total=len(lines),
                          callback_url=callback_url, meta=metadata, created_at=now)
            session.add(batch)
            session.flush()
            rows = [{"id": uuid.uuid4(), "api_key_id": api_key_id, "model": line.model, "status": TaskStatus.PENDING,
                     "request": line.body.stored(), "response_format": line.body.response_format, "attempts": 0,
                     "route": line.model, "retries_used": 0, "polls": 0, "cancel_requested": False,
                     "callback_url": line.callback_url, "batch_id": batch_id, "batch_line": index,
                     "custom_id": line.custom_id, "created_at": now, "run_after": now}
                    for index, line in enumerate(lines)]
            session.execute(insert(Task), rows)  # one multi-row INSERT per page, not a round trip a line
        return batch, [row["id"] for row in rows]

    def get(self, batch_id: uuid.UUID, api_key_id: uuid.UUID) -> tuple[Batch, dict[str, int]] | None:
        with self._sessions() as session:
            batch = session.scalars(select(Batch).where(Batch.id == batch_id, Batch.api_key_id == api_key_id)
                                    ).one_or_none()
            if batch is None:
                return None
            counts = dict(session.execute(select(Task.status, func.count()).where(Task.batch_id == batch_id)
                                          .group_by(Task.status)).all())
        return batch, counts

    def results(self, batch_id: uuid.UUID, page: int = 500) -> Iterator[ResultRow]:
        """Every line's task in line order, a page at a time (a 10 000-line batch is streamed)."""
        after = -1
        while True:
            with self._sessions() as session:
                tasks = list(session.scalars(select(Task).where(Task.batch_id == batch_id, Task.batch_line > after)
                                             .order_by(Task.batch_line).limit(page)))
                if not tasks:
                    return
                images: dict[uuid.UUID, list] = {}
                done = [task.id for task in tasks if task.status == TaskStatus.SUCCEED]
                for row in session.execute(select(Image.task_id, Image.id, Image.content_type, Image.revised_prompt)
                                           .where(Image.task_id.in_(done)).order_by(Image.slot, Image.index)):
                    images.setdefault(row.task_id, []).append((row.id, row.content_type, row.revised_prompt))
            for task in tasks:
                yield ResultRow(task.custom_id or "", task, images.get(task.id, []))
            after = tasks[-1].batch_line

    def cancel(self, batch_id: uuid.UUID, api_key_id: uuid.UUID) -> bool:
        """Pending tasks fail `cancelled` now, running ones stop before their next call; False if missing."""
        with self._sessions.begin() as session:
            found = session.execute(update(Batch).where(Batch.id == batch_id, Batch.api_key_id == api_key_id)
                                    .values(status=case((Batch.status == "in_progress", "cancelling"),
                                                        else_=Batch.status))
                                    .execution_options(synchronize_session=False)).rowcount
            if not found:
                return False
            cancelled = list(session.scalars(
                update(Task).where(Task.batch_id == batch_id, Task.status == TaskStatus.PENDING)
                .values(status=TaskStatus.FAILED, finished_at=utcnow(), **error_values(CANCELLED))
                .returning(Task.id).execution_options(synchronize_session=False)))
            session.execute(update(Task).where(Task.batch_id == batch_id, Task.status == TaskStatus.RUNNING)
                            .values(cancel_requested=True).execution_options(synchronize_session=False))
            enqueue_task_events(session, cancelled)
        return True

    def complete(self, batch_id: uuid.UUID) -> bool:
        """Close the batch once none of its tasks is unfinished. Run after the ending transaction
        committed: of several tasks ending at once, the last to commit sees all the others ended."""
        unfinished = select(Task.id).where(Task.batch_id == batch_id, Task.status.in_(UNFINISHED)).exists()
        with self._sessions.begin() as session:
            closed = session.execute(
                update(Batch).where(Batch.id == batch_id, Batch.status.in_(("in_progress", "cancelling")), ~unfinished)
                .values(status=case((Batch.status == "cancelling", "cancelled"), else_="completed"),
                        finished_at=utcnow())
                .execution_options(synchronize_session=False)).rowcount == 1
            if closed:
                enqueue_batch_event(session, batch_id)
        return closed

    def open_batches(self) -> list[uuid.UUID]:
        with self._sessions() as session:
            return list(session.scalars(select(Batch.id).where(Batch.status.in_(("in_progress", "cancelling")))))
