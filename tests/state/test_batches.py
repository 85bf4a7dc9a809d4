"""The batch transitions against real Postgres: cancel, and completion once its last task ended,
only once, as `cancelled` when it was cancelled; and its lines stored as sent."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from imagegate.app.db import make_sessionmaker
from imagegate.app.failures import ErrorCode
from imagegate.app.models import Batch, Task, WebhookEvent
from imagegate.app.schemas import GenerationRequest
from imagegate.app.state.batches import BatchStatus
from imagegate.app.state.refused import Refused
from imagegate.app.state.tasks import TaskStatus
from imagegate.app.stores.batches import BatchStore, NewLine
from tests.state.rows import make_task, new_key, task_row


@pytest.fixture(scope="module")
def batches(engine):
    return BatchStore(make_sessionmaker(engine))


def new_batch(batches, engine, key_id, *statuses: TaskStatus) -> tuple[uuid.UUID, list[uuid.UUID]]:
    batch, _ = batches.create(api_key_id=key_id, lines=[], callback_url="https://hooks.example/b", metadata=None)
    tasks = [
        make_task(
            engine,
            key_id,
            batch_id=batch.id,
            batch_line=line,
            status=status,
            attempts=0 if status == TaskStatus.PENDING else 1,
        )
        for line, status in enumerate(statuses)
    ]
    return batch.id, tasks


def status_of(engine, batch_id) -> str:
    with engine.connect() as connection:
        return connection.scalar(select(Batch.status).where(Batch.id == batch_id))


def test_a_new_batch_is_in_progress(batches, engine, key_id):
    batch_id, _ = new_batch(batches, engine, key_id)
    assert status_of(engine, batch_id) == BatchStatus.IN_PROGRESS


def test_a_batch_completes_once_its_last_task_ended_and_only_once(batches, engine, key_id):
    batch_id, _ = new_batch(batches, engine, key_id, TaskStatus.SUCCEED, TaskStatus.RUNNING)
    assert batches.complete(batch_id) is False
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE tasks SET status = 'failed' WHERE batch_id = %s", (batch_id,))
    assert batches.complete(batch_id) is True
    assert status_of(engine, batch_id) == BatchStatus.COMPLETED
    assert batches.complete(batch_id) is False
    with engine.connect() as connection:
        events = connection.scalars(select(WebhookEvent.type).where(WebhookEvent.batch_id == batch_id)).all()
    assert events == ["image.batch.completed"]  # one event: the second completion wrote nothing
    assert batches.complete(uuid.uuid4()) is False


def test_a_cancelled_batch_ends_its_pending_tasks_stops_its_running_ones_and_closes_cancelled(batches, engine, key_id):
    batch_id, (pending, running, done) = new_batch(
        batches, engine, key_id, TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.SUCCEED
    )
    assert batches.cancel(batch_id, key_id) is True
    assert status_of(engine, batch_id) == BatchStatus.CANCELLING
    assert (task_row(engine, pending).status, task_row(engine, pending).error_code) == (
        TaskStatus.FAILED,
        ErrorCode.CANCELLED,
    )
    assert (task_row(engine, running).status, task_row(engine, running).cancel_requested) == (TaskStatus.RUNNING, True)
    assert task_row(engine, done).status == TaskStatus.SUCCEED
    assert batches.cancel(batch_id, key_id) is True  # again: harmless
    assert batches.complete(batch_id) is False
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE tasks SET status = 'failed' WHERE id = %s", (running,))
    assert batches.complete(batch_id) is True
    assert status_of(engine, batch_id) == BatchStatus.CANCELLED
    assert batches.cancel(batch_id, key_id) is Refused.ALREADY_ENDED


def test_a_batch_cancel_is_refused_for_another_key_or_a_missing_batch(batches, engine, key_id):
    batch_id, (pending,) = new_batch(batches, engine, key_id, TaskStatus.PENDING)
    assert batches.cancel(batch_id, new_key(engine)) is Refused.NOT_OWNER
    assert status_of(engine, batch_id) == BatchStatus.IN_PROGRESS
    assert task_row(engine, pending).status == TaskStatus.PENDING
    assert batches.cancel(uuid.uuid4(), key_id) is Refused.NOT_FOUND


def test_a_batchs_lines_are_stored_as_sent(batches, engine, key_id):
    """Every line's columns come back as given, whatever their characters: they are bound as one
    binary array per column (app/db.py), NULLs and quoting included."""
    awkward = ["q\"uo'te", "com,ma", "{br}aces", "back\\slash", "", "ünï ✓", "NULL"]
    lines = [
        NewLine(
            custom_id=custom_id,
            model="fake-dalle",
            body=GenerationRequest(prompt=f"tile {index}: {custom_id}", n=1 + index % 2),
            callback_url=None if index % 2 else f"https://hooks.example/{index}",
        )
        for index, custom_id in enumerate(awkward)
    ]
    batch, task_ids = batches.create(api_key_id=key_id, lines=lines, callback_url=None, metadata=None)
    with engine.connect() as connection:
        rows = connection.execute(
            select(Task.id, Task.custom_id, Task.batch_line, Task.callback_url, Task.request, Task.status)
            .where(Task.batch_id == batch.id)
            .order_by(Task.batch_line)
        ).all()
    assert [row.id for row in rows] == task_ids
    assert [row.batch_line for row in rows] == list(range(len(awkward)))
    assert [row.custom_id for row in rows] == awkward
    assert [row.callback_url for row in rows] == [line.callback_url for line in lines]
    assert [row.request for row in rows] == [line.body.stored() for line in lines]
    assert {row.status for row in rows} == {TaskStatus.PENDING}
