"""An attempt its model's upstream limits have no room for, against real Postgres: the claim is rolled
back and the task waits pending (`wait_for_model`) with its attempt count and retries untouched, its
reason stored, and run_after moved on so the sweeper does not take the wait for a lost message."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import IntegrityError

from imagegate.app.db import make_sessionmaker
from imagegate.app.models import Attempt, Task, utcnow
from imagegate.app.state.attempts import wait_for_model
from imagegate.app.state.refused import Refused
from imagegate.app.state.tasks import QueuedReason, TaskStatus
from imagegate.app.stores.attempts import AttemptStore, Wait, Waiting
from imagegate.app.stores.tasks import TaskStore
from tests.state.rows import make_task, task_row


@pytest.fixture(scope="module")
def store(engine):
    return AttemptStore(engine)


def every_slot(claim, done):
    return list(range(claim.request["n"]))


def no_room(reason=QueuedReason.MODEL_CONCURRENCY_LIMIT, countdown_s=30.0):
    return lambda claim, slots: Wait(reason, countdown_s)


def room(claim, slots):
    return None


def test_an_attempt_with_no_room_is_not_claimed_and_waits_pending_saying_why(store, key_id):
    task_id = make_task(store.engine, key_id, n=2, retries_used=1)
    before = utcnow()
    outcome = store.claim(task_id, 1, worker="w1", lease_s=60, plan=every_slot, admit=no_room(countdown_s=30))
    assert isinstance(outcome, Waiting)
    assert (outcome.task_id, outcome.attempt, outcome.reason) == (task_id, 1, QueuedReason.MODEL_CONCURRENCY_LIMIT)
    row = task_row(store.engine, task_id)
    assert row.status == TaskStatus.PENDING and row.attempts == 0 and row.retries_used == 1
    assert row.queued_reason == "model_concurrency_limit" and row.worker is None and row.started_at is None
    assert before + timedelta(seconds=29) < row.run_after < utcnow() + timedelta(seconds=31)
    with store.engine.connect() as connection:  # the planned calls were rolled back with the claim
        assert connection.scalar(select(func.count()).where(Attempt.task_id == task_id)) == 0


def test_the_same_attempt_is_claimed_once_there_is_room_and_the_reason_is_cleared(store, key_id):
    task_id = make_task(store.engine, key_id)
    store.claim(task_id, 1, worker="w1", lease_s=60, plan=every_slot, admit=no_room(QueuedReason.MODEL_RATE_LIMIT))
    assert task_row(store.engine, task_id).queued_reason == "model_rate_limit"
    claim = store.claim(task_id, 1, worker="w1", lease_s=60, plan=every_slot, admit=room)
    assert claim and claim.attempt == 1
    row = task_row(store.engine, task_id)
    assert row.status == TaskStatus.RUNNING and row.attempts == 1 and row.queued_reason is None


def test_a_wait_is_refused_when_another_delivery_claimed_the_attempt_or_the_task_ended(store, key_id):
    claimed_meanwhile = make_task(store.engine, key_id, status=TaskStatus.RUNNING, attempts=1)
    cancelled = make_task(store.engine, key_id, status=TaskStatus.FAILED, error_code="cancelled")

    def wait(task_id):
        with store.engine.begin() as connection:
            return wait_for_model(
                connection, task_id, 1, now=utcnow(), reason=QueuedReason.MODEL_RATE_LIMIT, countdown_s=5
            )

    assert wait(claimed_meanwhile) is Refused.ALREADY_CLAIMED
    assert wait(cancelled) is Refused.ALREADY_ENDED
    assert task_row(store.engine, claimed_meanwhile).queued_reason is None
    assert task_row(store.engine, cancelled).status == TaskStatus.FAILED


def test_the_sweeper_does_not_republish_a_waiting_task(store, engine, key_id):
    """Tasks accepted long ago: one waiting for its model (due in 30 s), one whose message was lost."""
    long_ago = utcnow() - timedelta(minutes=5)
    waiting = make_task(engine, key_id, created_at=long_ago, run_after=long_ago)
    lost = make_task(engine, key_id, created_at=long_ago, run_after=long_ago)
    assert isinstance(store.claim(waiting, 1, worker="w", lease_s=60, plan=every_slot, admit=no_room()), Waiting)
    republished = {item.task_id for item in TaskStore(make_sessionmaker(engine)).overdue_pending(1.0)}
    assert lost in republished and waiting not in republished


def test_the_database_allows_exactly_the_reasons(engine, key_id):
    with engine.connect() as connection:
        definition = connection.execute(
            text("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'ck_tasks_queued_reason'")
        ).scalar_one()
    assert set(re.findall(r"'([^']*)'", definition)) == {reason.value for reason in QueuedReason}
    task_id = make_task(engine, key_id)
    with pytest.raises(IntegrityError, match="ck_tasks_queued_reason"), engine.begin() as connection:
        connection.execute(update(Task).where(Task.id == task_id).values(queued_reason="waiting_for_godot"))
