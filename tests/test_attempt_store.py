"""The worker's transitions against real Postgres: a claim records its calls with it, a group of
successes keeps each one's fence, and leases are renewed only where the attempt is still ours."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select, text, update

from app.attempt_store import AttemptStore, NewImage, Success
from app.db import make_engine
from app.keys import create_key
from app.db import make_sessionmaker
from app.models import Attempt, Image, Task, utcnow

PNG = b"\x89PNG\r\n\x1a\n" + b"x" * 64


@pytest.fixture(scope="module")
def store(database_url, migrated):
    engine = make_engine(database_url, pool_size=2, pre_ping=False)
    yield AttemptStore(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def key_id(store):
    create_key(make_sessionmaker(store.engine), f"attempt-store-{uuid.uuid4().hex[:6]}")
    with store.engine.connect() as connection:
        return connection.execute(text("SELECT id FROM api_keys ORDER BY created_at DESC LIMIT 1")).scalar_one()


def pending_task(store, key_id, n: int = 1) -> uuid.UUID:
    task_id = uuid.uuid4()
    with store.engine.begin() as connection:
        connection.execute(Task.__table__.insert().values(
            id=task_id, api_key_id=key_id, model="local", status="pending", attempts=0, route="local",
            retries_used=0, polls=0, cancel_requested=False, response_format="b64_json", created_at=utcnow(),
            run_after=utcnow(), request={"model": "local", "prompt": "p", "n": n}))
    return task_id


def claimed(store, key_id, n: int = 1):
    return store.claim(pending_task(store, key_id, n), 1, worker="w1", lease_s=60,
                       plan=lambda claim, done: list(range(claim.request["n"])))


def test_a_claim_records_its_calls_and_a_second_delivery_claims_nothing(store, key_id):
    claim = claimed(store, key_id, n=3)
    assert claim.slots == (0, 1, 2) and claim.attempt == 1
    with store.engine.connect() as connection:
        slots = connection.scalars(select(Attempt.slot).where(Attempt.task_id == claim.task_id)).all()
    assert sorted(slots) == [0, 1, 2]
    assert store.claim(claim.task_id, 1, worker="w2", lease_s=60, plan=lambda c, d: [0]) is None


def test_a_group_of_successes_writes_each_one_still_owned_and_refuses_the_rest(store, key_id):
    mine, cancelled, taken_back = (claimed(store, key_id) for _ in range(3))
    with store.engine.begin() as connection:
        connection.execute(update(Task).where(Task.id == cancelled.task_id).values(cancel_requested=True))
        # The sweeper gave this attempt away: the task is pending for attempt 2 now.
        connection.execute(update(Task).where(Task.id == taken_back.task_id).values(status="pending"))
    written = store.succeed_many([Success(claim, [NewImage(PNG, "image/png")], {"total_tokens": 7}, [])
                                  for claim in (mine, cancelled, taken_back)])
    assert written == [True, False, False]
    with store.engine.connect() as connection:
        rows = {row.id: row for row in connection.execute(select(Task.id, Task.status, Task.usage))}
        stored = connection.execute(select(Image.task_id)).scalars().all()
    assert rows[mine.task_id].status == "succeed" and rows[mine.task_id].usage == {"total_tokens": 7}
    assert rows[cancelled.task_id].status == "running" and rows[taken_back.task_id].status == "pending"
    assert mine.task_id in stored and cancelled.task_id not in stored and taken_back.task_id not in stored


def test_leases_are_renewed_only_for_attempts_still_held(store, key_id):
    held, lost = claimed(store, key_id), claimed(store, key_id)
    with store.engine.begin() as connection:
        connection.execute(update(Task).where(Task.id == lost.task_id).values(status="pending"))
        before = dict(connection.execute(select(Task.id, Task.lease_expires_at)
                                         .where(Task.id.in_([held.task_id, lost.task_id]))).all())
    renewed = store.extend_leases([(held.task_id, 1), (lost.task_id, 1), (held.task_id, 2)], lease_s=600)
    assert renewed == 1
    with store.engine.connect() as connection:
        after = dict(connection.execute(select(Task.id, Task.lease_expires_at)
                                        .where(Task.id.in_([held.task_id, lost.task_id]))).all())
    assert after[held.task_id] > before[held.task_id]
    assert after[lost.task_id] == before[lost.task_id]
