"""Batches: many generation requests accepted at once (bulk insert), tracked together, completed
(with a webhook) when the last of their tasks ends. Their transitions are in app.state.batches."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, Row, func, select
from sqlalchemy.orm import Session, sessionmaker

from imagegate.app.idempotency import reserve
from imagegate.app.key_limits import Admission, Admit
from imagegate.app.models import Batch, Image, Task, utcnow
from imagegate.app.schemas import GenerationRequest
from imagegate.app.state import batches as transitions
from imagegate.app.state import tasks as task_transitions
from imagegate.app.state.batches import OPEN
from imagegate.app.state.refused import Outcome
from imagegate.app.state.tasks import TaskStatus
from imagegate.app.stores.webhooks import enqueue_batch_event, enqueue_task_events


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
        self._engine: Engine = sessions.kw["bind"]

    def create(
        self,
        *,
        api_key_id: uuid.UUID,
        lines: list[NewLine],
        callback_url: str | None,
        metadata: dict[str, Any] | None,
        idempotency: tuple[str, str] | None = None,
        admit: Admit | None = None,
    ) -> tuple[Batch | Row, list[uuid.UUID]]:
        """The batch (a Core row with the Batch's attribute names when new) and the ids of its new tasks
        (none when an Idempotency-Key replays an earlier batch). `admit` (the key's limits) runs in
        the transaction, only for a batch that is not a replay, and may refuse it."""
        now, batch_id = utcnow(), uuid.uuid4()
        with Admission(admit) as admission, self._sessions.begin() as session:
            if idempotency is not None:
                earlier = reserve(session, api_key_id, *idempotency, batch_id=batch_id)
                if earlier is not None:
                    return session.get(Batch, earlier.batch_id), []
            connection = session.connection()
            admission.run(connection)
            batch = transitions.accept(
                connection,
                api_key_id=api_key_id,
                total=len(lines),
                callback_url=callback_url,
                metadata=metadata,
                now=now,
                batch_id=batch_id,
            )
            rows = [
                task_transitions.new_task(
                    api_key_id=api_key_id,
                    model=line.model,
                    request=line.body.stored(),
                    response_format=line.body.response_format,
                    callback_url=line.callback_url,
                    now=now,
                    batch_id=batch_id,
                    batch_line=index,
                    custom_id=line.custom_id,
                )
                for index, line in enumerate(lines)
            ]
            if rows:  # one INSERT for every line: 10,000 single-row INSERTs were half the answer's time
                task_transitions.accept_many(connection, rows)
        return batch, [row["id"] for row in rows]

    def get(self, batch_id: uuid.UUID, api_key_id: uuid.UUID) -> tuple[Batch, dict[str, int]] | None:
        with self._sessions() as session:
            batch = session.scalars(
                select(Batch).where(Batch.id == batch_id, Batch.api_key_id == api_key_id)
            ).one_or_none()
            if batch is None:
                return None
            counts = dict(
                session.execute(
                    select(Task.status, func.count()).where(Task.batch_id == batch_id).group_by(Task.status)
                ).all()
            )
        return batch, counts

    def results(self, batch_id: uuid.UUID, page: int = 500) -> Iterator[ResultRow]:
        """Every line's task in line order, a page at a time (a 10 000-line batch is streamed)."""
        after = -1
        while True:
            with self._sessions() as session:
                tasks = list(
                    session.scalars(
                        select(Task)
                        .where(Task.batch_id == batch_id, Task.batch_line > after)
                        .order_by(Task.batch_line)
                        .limit(page)
                    )
                )
                if not tasks:
                    return
                images: dict[uuid.UUID, list] = {}
                done = [task.id for task in tasks if task.status == TaskStatus.SUCCEED]
                for row in session.execute(
                    select(Image.task_id, Image.id, Image.content_type, Image.revised_prompt)
                    .where(Image.task_id.in_(done))
                    .order_by(Image.slot, Image.index)
                ):
                    images.setdefault(row.task_id, []).append((row.id, row.content_type, row.revised_prompt))
            for task in tasks:
                yield ResultRow(task.custom_id or "", task, images.get(task.id, []))
            after = tasks[-1].batch_line

    def cancel(self, batch_id: uuid.UUID, api_key_id: uuid.UUID) -> Outcome:
        """Pending tasks fail `cancelled` now, running ones stop before their next call; refused
        `not_found`, `not_owner` or `already_ended`."""
        with self._engine.begin() as connection:
            cancelling = transitions.cancel(connection, batch_id, api_key_id)
            if cancelling:
                enqueue_task_events(connection, task_transitions.cancel_batch_tasks(connection, batch_id))
        return cancelling

    def complete(self, batch_id: uuid.UUID) -> bool:
        """Close the batch once none of its tasks is unfinished. Run after the ending transaction
        committed: of several tasks ending at once, the last to commit sees all the others ended."""
        with self._engine.begin() as connection:
            closed = transitions.complete(connection, batch_id, utcnow())
            if closed:
                enqueue_batch_event(connection, batch_id)
        return closed

    def open_batches(self) -> list[uuid.UUID]:
        with self._sessions() as session:
            return list(session.scalars(select(Batch.id).where(Batch.status.in_(OPEN))))
