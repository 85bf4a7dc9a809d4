"""Claims made as a group (app/stores/claim_groups.py claim_many, what a busy worker does) against real Postgres:
each ask gets what its own `claim` would have given, in order: the claim with its calls recorded,
why it was refused, the wait its model's limits asked for, or the error its admission raised; and
concurrent groups claim each attempt once."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select

from imagegate.app.db import make_sessionmaker
from imagegate.app.models import Attempt, Image, Task, utcnow
from imagegate.app.state.refused import Refused
from imagegate.app.state.tasks import CancelOutcome, QueuedReason, TaskStatus
from imagegate.app.stores.attempts import AttemptStore, Claim, ClaimAsk, Wait, Waiting
from imagegate.app.stores.claim_groups import claim_many
from imagegate.app.stores.tasks import TaskStore
from tests.state.rows import make_task, task_row


@pytest.fixture(scope="module")
def store(engine):
    return AttemptStore(engine)


def every_slot(claim, done):
    return [slot for slot in range(claim.request["n"]) if slot not in done]


def ask(task_id, attempt=1, *, admit=None, worker="w1"):
    return ClaimAsk(task_id, attempt, worker, 60, every_slot, admit)


def test_a_group_gives_each_ask_what_its_own_claim_would(store, key_id):
    fresh = make_task(store.engine, key_id, n=2)
    retried = make_task(store.engine, key_id, n=3, attempts=1)  # attempt 1 stored slot 1's image
    with store.engine.begin() as connection:
        connection.execute(
            Image.__table__.insert(),
            {
                "task_id": retried,
                "slot": 1,
                "index": 0,
                "content_type": "image/png",
                "data": b"x",
                "created_at": utcnow(),
            },
        )
    ended = make_task(store.engine, key_id, status=TaskStatus.SUCCEED, attempts=1)
    running = make_task(store.engine, key_id, status=TaskStatus.RUNNING, attempts=1)

    results = claim_many(
        store, [ask(fresh), ask(retried, 2), ask(ended), ask(running), ask(running, 3), ask(fresh), ask(ended)]
    )

    first, second = results[0], results[1]
    assert isinstance(first, Claim) and first.slots == (0, 1) and first.attempt == 1 and first.polls == 0
    assert isinstance(second, Claim) and second.slots == (0, 2) and second.attempt == 2
    assert results[2:] == [
        Refused.ALREADY_ENDED,
        Refused.ALREADY_CLAIMED,  # attempt 1 is running: another delivery holds it
        Refused.STALE_ATTEMPT,
        Refused.ALREADY_CLAIMED,  # the same message twice in one group
        Refused.ALREADY_ENDED,
    ]
    row = task_row(store.engine, fresh)
    assert (row.status, row.attempts, row.worker) == (TaskStatus.RUNNING, 1, "w1")
    assert row.lease_expires_at is not None and row.started_at == first.started_at
    with store.engine.connect() as connection:
        calls = connection.execute(select(Attempt.task_id, Attempt.number, Attempt.slot)).all()
    assert {(number, slot) for task_id, number, slot in calls if task_id == fresh} == {(1, 0), (1, 1)}
    assert {(number, slot) for task_id, number, slot in calls if task_id == retried} == {(2, 0), (2, 2)}


def test_a_wait_or_an_admission_error_leaves_only_that_task_unclaimed(store, key_id):
    admitted, waits, failing = (make_task(store.engine, key_id) for _ in range(3))

    def broken(claim, slots):
        raise RuntimeError("limits unavailable")

    results = claim_many(
        store,
        [
            ask(admitted, admit=lambda claim, slots: None),
            ask(waits, admit=lambda claim, slots: Wait(QueuedReason.MODEL_CONCURRENCY_LIMIT, 30.0)),
            ask(failing, admit=broken),
        ],
    )

    assert isinstance(results[0], Claim)
    assert isinstance(results[1], Waiting) and results[1].countdown_s == 30.0
    assert isinstance(results[2], RuntimeError)
    assert task_row(store.engine, admitted).status == TaskStatus.RUNNING
    waiting = task_row(store.engine, waits)
    assert (waiting.status, waiting.attempts, waiting.queued_reason) == (
        TaskStatus.PENDING,
        0,
        QueuedReason.MODEL_CONCURRENCY_LIMIT,
    )
    assert (task_row(store.engine, failing).status, task_row(store.engine, failing).attempts) == (TaskStatus.PENDING, 0)
    with store.engine.connect() as connection:
        called = set(connection.scalars(select(Attempt.task_id).where(Attempt.task_id.in_([waits, failing]))))
    assert called == set()


class Together:
    """Admits sharing one `together`, as the worker's model admission makes them: records each call."""

    def __init__(self, answer_for):
        self.answer_for, self.calls = answer_for, []

    def admit(self):
        def admit(claim, slots):
            return self.together([(admit, claim, slots)])[0]

        admit.together = self.together
        return admit

    def together(self, asked):
        self.calls.append([(claim.task_id, slots) for _, claim, slots in asked])
        return [self.answer_for(claim.task_id) for _, claim, _ in asked]


def test_admits_sharing_a_together_are_asked_once_for_the_group_and_each_gets_its_answer(store, key_id):
    admitted, waits, failing = (make_task(store.engine, key_id, n=2) for _ in range(3))
    answers = {waits: Wait(QueuedReason.MODEL_RATE_LIMIT, 12.0), failing: RuntimeError("limits unavailable")}
    shared = Together(lambda task_id: answers.get(task_id))

    results = claim_many(store, [ask(task_id, admit=shared.admit()) for task_id in (admitted, waits, failing)])

    assert shared.calls == [[(admitted, [0, 1]), (waits, [0, 1]), (failing, [0, 1])]]
    assert isinstance(results[0], Claim) and results[0].slots == (0, 1)
    assert isinstance(results[1], Waiting) and results[1].countdown_s == 12.0
    assert isinstance(results[2], RuntimeError)
    assert task_row(store.engine, admitted).status == TaskStatus.RUNNING
    assert task_row(store.engine, waits).queued_reason == QueuedReason.MODEL_RATE_LIMIT
    assert (task_row(store.engine, failing).status, task_row(store.engine, failing).attempts) == (TaskStatus.PENDING, 0)


def test_concurrent_overlapping_groups_claim_each_attempt_once(store, key_id):
    task_ids = [make_task(store.engine, key_id) for _ in range(40)]
    start = threading.Barrier(4)

    def claim_group(worker: str):
        start.wait()
        order = task_ids if worker in ("a", "c") else list(reversed(task_ids))
        return claim_many(store, [ask(task_id, worker=worker) for task_id in order])

    with ThreadPoolExecutor(4) as pool:
        groups = list(pool.map(claim_group, "abcd"))

    won = [claim.task_id for results in groups for claim in results if isinstance(claim, Claim)]
    assert sorted(won) == sorted(task_ids)
    refused = [answer for results in groups for answer in results if not isinstance(answer, Claim)]
    assert refused and set(refused) == {Refused.ALREADY_CLAIMED}
    with store.engine.connect() as connection:
        rows = connection.execute(select(Task.status, Task.attempts).where(Task.id.in_(task_ids))).all()
        calls = connection.scalar(select(func.count()).where(Attempt.task_id.in_(task_ids)))
    assert set(rows) == {(TaskStatus.RUNNING, 1)}
    assert calls == 40


def test_an_attempt_claimed_or_cancelled_while_its_calls_were_admitted_is_refused(store, key_id):
    """Nothing is locked between the group's read and its claim: a task another worker claims, or
    one that is cancelled, in that time is refused (the caller hands its room back), the others
    are claimed, and only the winner's calls are recorded."""
    raced, cancelled, calm = (make_task(store.engine, key_id) for _ in range(3))

    def another_worker_claims_first(claim, slots):
        (won,) = claim_many(store, [ask(raced, worker="w2")])
        assert isinstance(won, Claim)

    def the_client_cancels_first(claim, slots):
        assert TaskStore(make_sessionmaker(store.engine)).cancel(cancelled, key_id) is CancelOutcome.ENDED

    results = claim_many(
        store,
        [
            ask(raced, admit=another_worker_claims_first),
            ask(cancelled, admit=the_client_cancels_first),
            ask(calm, admit=lambda claim, slots: None),
        ],
    )

    assert results[:2] == [Refused.ALREADY_CLAIMED, Refused.ALREADY_ENDED]
    assert isinstance(results[2], Claim)
    assert (task_row(store.engine, raced).worker, task_row(store.engine, raced).attempts) == ("w2", 1)
    with store.engine.connect() as connection:
        calls = connection.execute(
            select(Attempt.task_id, Attempt.worker).where(Attempt.task_id.in_([raced, cancelled, calm]))
        ).all()
    assert sorted(calls) == sorted([(raced, "w2"), (calm, "w1")])
