"""The input files of edit tasks (app.edits): written in the task's intake transaction, read by
each attempt, deleted once the task has ended (the sweeper) or when the task is deleted."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from sqlalchemy import Connection, Engine, delete, insert, select

from imagegate.app.edits import IMAGE, MASK, InputFile
from imagegate.app.models import Task, TaskInput, utcnow
from imagegate.app.state.tasks import ENDED

inputs, tasks = TaskInput.__table__, Task.__table__

# Ended tasks whose input files one sweep deletes at most: bounded work per pass.
FORGET_PER_PASS = 200


def save_inputs(connection: Connection, task_id: uuid.UUID, files: Iterable[InputFile]) -> None:
    """Inside the transaction that accepts the task: the task is never pending without its files."""
    now = utcnow()
    rows = [
        {
            "task_id": task_id,
            "role": file.role,
            "index": file.index,
            "content_type": file.content_type,
            "filename": file.filename,
            "data": file.data,
            "created_at": now,
        }
        for file in files
    ]
    if rows:
        connection.execute(insert(inputs), rows)


def load_inputs(engine: Engine, task_id: uuid.UUID) -> tuple[list[InputFile], InputFile | None]:
    """(the images in order, the mask or None)."""
    with engine.connect() as connection:
        rows = connection.execute(
            select(inputs.c.role, inputs.c.index, inputs.c.content_type, inputs.c.filename, inputs.c.data)
            .where(inputs.c.task_id == task_id)
            .order_by(inputs.c.role, inputs.c.index)
        ).all()
    files = [InputFile(row.role, row.index, row.content_type, bytes(row.data), row.filename) for row in rows]
    return [file for file in files if file.role == IMAGE], next((file for file in files if file.role == MASK), None)


def delete_inputs(connection: Connection, task_ids: list[uuid.UUID]) -> int:
    """Delete the input files of these tasks (a deleted task's, say): rows deleted."""
    if not task_ids:
        return 0
    return connection.execute(delete(inputs).where(inputs.c.task_id.in_(task_ids))).rowcount


def forget_ended(engine: Engine, limit: int = FORGET_PER_PASS) -> int:
    """Delete the input files of up to `limit` ended tasks; returns how many tasks'. The table holds
    only unfinished edits and those ended since the last pass, so the join stays small."""
    with engine.begin() as connection:
        ended = list(
            connection.scalars(
                select(inputs.c.task_id)
                .join(tasks, tasks.c.id == inputs.c.task_id)
                .where(tasks.c.status.in_(ENDED))
                .distinct()
                .limit(limit)
            )
        )
        delete_inputs(connection, ended)
    return len(ended)
