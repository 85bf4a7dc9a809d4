"""The task transitions of intake, cancel and the sweeper against real Postgres: each is guarded, and
a refused cancel says why."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select

from imagegate.app.db import make_sessionmaker
from imagegate.app.failures import ErrorCode, Failure
from imagegate.app.models import Task, WebhookEvent, utcnow
from imagegate.app.state import tasks as transitions
from imagegate.app.state.refused import Refused
from imagegate.app.state.tasks import CancelOutcome, TaskStatus
from imagegate.app.stores.tasks import TaskStore
from tests.state.rows import make_task, new_key, task_row


@pytest.fixture(scope="module")
def store(engine):
    return TaskStore(make_sessionmaker(engine))


def events_of(engine, task_id) -> list[str]:
    with engine.connect() as connection:
        return list(connection.scalars(select(WebhookEvent.type).where(WebhookEvent.task_id == task_id)))


def test_intake_accepts_a_pending_task(store, engine, key_id):
    task, new = store.create(api_key_id=key_id, model="local", request={"prompt": "p"}, response_format="url")
    row = task_row(engine, task.id)
    assert new and (row.status, row.attempts, row.route, row.cancel_requested) == (
        TaskStatus.PENDING,
        0,
        "local",
        False,
    )


def test_cancelling_a_pending_task_ends_it_and_announces_it(store, engine, key_id):
    task_id = make_task(engine, key_id, callback_url="https://hooks.example/x")
    assert store.cancel(task_id, key_id) is CancelOutcome.ENDED
    row = task_row(engine, task_id)
    assert (row.status, row.error_code) == (TaskStatus.FAILED, ErrorCode.CANCELLED) and row.finished_at
    assert events_of(engine, task_id) == ["image.task.failed"]


def test_cancelling_a_running_task_asks_its_worker_to_stop(store, engine, key_id):
    task_id = make_task(engine, key_id, status=TaskStatus.RUNNING, attempts=1)
    assert store.cancel(task_id, key_id) is CancelOutcome.REQUESTED
    row = task_row(engine, task_id)
    assert (row.status, row.cancel_requested, row.error_code, row.finished_at) == (TaskStatus.RUNNING, True, None, None)


def test_a_cancel_is_refused_with_its_reason(store, engine, key_id):
    others = make_task(engine, new_key(engine))
    assert store.cancel(others, key_id) is Refused.NOT_OWNER
    assert task_row(engine, others).status == TaskStatus.PENDING
    ended = make_task(engine, key_id, status=TaskStatus.SUCCEED, attempts=1)
    assert store.cancel(ended, key_id) is Refused.ALREADY_ENDED
    assert task_row(engine, ended).status == TaskStatus.SUCCEED
    assert store.cancel(uuid.uuid4(), key_id) is Refused.NOT_FOUND


def test_expired_attempts_go_back_to_pending_or_fail(engine, key_id):
    expired = utcnow() - timedelta(minutes=1)
    lost = make_task(engine, key_id, status=TaskStatus.RUNNING, attempts=1, lease_expires_at=expired)
    last = make_task(engine, key_id, status=TaskStatus.RUNNING, attempts=3, lease_expires_at=expired)
    alive = make_task(
        engine, key_id, status=TaskStatus.RUNNING, attempts=1, lease_expires_at=utcnow() + timedelta(minutes=1)
    )
    pending = make_task(engine, key_id, run_after=expired)
    with engine.begin() as connection:
        failed = transitions.fail_expired(connection, utcnow(), max_attempts=3)
        requeued = transitions.requeue_expired(connection, utcnow(), Failure("worker_lost", "gone"))
    assert last in failed and not {lost, alive, pending} & set(failed)
    assert (lost, 1, None) in [tuple(row) for row in requeued]
    assert not {alive, last, pending} & {row.id for row in requeued}
    assert task_row(engine, last).error_code == ErrorCode.ATTEMPTS_EXHAUSTED
    assert (task_row(engine, lost).status, task_row(engine, alive).status) == (TaskStatus.PENDING, TaskStatus.RUNNING)


def test_overdue_tasks_fail_whatever_they_were_doing_unless_ended(engine, key_id):
    old = utcnow() - timedelta(hours=2)
    unfinished = [
        make_task(engine, key_id, created_at=old),
        make_task(engine, key_id, status=TaskStatus.RUNNING, attempts=1, created_at=old),
    ]
    ended = make_task(engine, key_id, status=TaskStatus.SUCCEED, attempts=1, created_at=old)
    with engine.begin() as connection:
        failed = transitions.fail_overdue(
            connection, utcnow() - timedelta(hours=1), Failure(ErrorCode.DEADLINE_EXCEEDED, "late")
        )
    assert set(unfinished) <= set(failed) and ended not in failed
    assert {task_row(engine, task_id).status for task_id in unfinished} == {TaskStatus.FAILED}


def test_republishing_takes_the_oldest_overdue_pending_tasks_once(engine, key_id):
    lane = uuid.uuid4().hex  # keeps other tests' overdue tasks out
    tasks = [
        make_task(engine, key_id, run_after=utcnow() - timedelta(minutes=10 - index), custom_id=lane)
        for index in range(3)
    ]
    mine = Task.custom_id == lane
    due_before = utcnow() - timedelta(minutes=1)
    with engine.begin() as connection:
        first = transitions.republish_overdue(connection, due_before, mine, limit=2)
        again = transitions.republish_overdue(connection, due_before, mine)
    assert {row.id for row in first} == set(tasks[:2])
    assert [row.id for row in again] == [tasks[2]]


def test_deleting_keeps_the_status_and_is_done_once(store, engine, key_id):
    task_id = make_task(
        engine,
        key_id,
        n=2,
        status=TaskStatus.FAILED,
        error_code=ErrorCode.UPSTREAM_REJECTED,
        error_message="rejected",
        error_details={"upstream": "your prompt 'p' was refused"},
        finished_at=utcnow(),
    )
    with engine.begin() as connection:
        assert transitions.mark_deleted(connection, task_id, {"prompt": "(deleted)", "n": 2})
        assert not transitions.mark_deleted(connection, task_id, {"prompt": "again"})
    row = task_row(engine, task_id)
    assert (row.deleted, row.status, row.error_code, row.error_details) == (
        True,
        TaskStatus.FAILED,
        ErrorCode.UPSTREAM_REJECTED,
        None,
    )
    assert row.request == {"prompt": "(deleted)", "n": 2} and row.finished_at


def test_deleting_a_running_task_asks_it_to_stop_and_refuses_another_key(store, engine, key_id):
    task_id = make_task(engine, key_id, status=TaskStatus.RUNNING, attempts=1)
    assert store.delete(task_id, new_key(engine)) is Refused.NOT_OWNER
    assert store.delete(uuid.uuid4(), key_id) is Refused.NOT_FOUND
    assert not task_row(engine, task_id).deleted
    deleted = store.delete(task_id, key_id)
    assert deleted.cancelled is CancelOutcome.REQUESTED
    row = task_row(engine, task_id)
    assert (row.status, row.cancel_requested, row.deleted) == (TaskStatus.RUNNING, True, True)
    assert store.delete(task_id, key_id).cancelled is None  # again: nothing more to cancel
