"""The worker's transitions against real Postgres: one claim wins among concurrent claimers and
records its calls, every later write is fenced on the attempt and says why it was refused, a group
of successes keeps each one's fence, and leases are renewed only where the attempt is still ours."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select, update

from imagegate.app.failures import ErrorCode, Failure
from imagegate.app.models import Attempt, Image, Task, WebhookEvent
from imagegate.app.state.refused import Refused
from imagegate.app.state.tasks import TaskStatus
from imagegate.app.stores.attempts import AttemptStore, CallOutcome, NewImage, Success
from tests.state.rows import make_task, new_key, task_row

PNG = b"\x89PNG\r\n\x1a\n" + b"x" * 64
BROKEN = Failure(ErrorCode.UPSTREAM_ERROR, "upstream 503", upstream_status=503)


@pytest.fixture(scope="module")
def store(engine):
    return AttemptStore(engine)


@pytest.fixture(params=["postgres", "sqlite"])
def either(request, store, key_id, tmp_path_factory):
    """(store, key) on this run's Postgres, where a group of successes is one statement, and on the
    embedded mode's SQLite, where it is a statement each: the same outcome on both."""
    if request.param == "postgres":
        return store, key_id
    from imagegate.app.db import make_engine
    from imagegate.app.migrate import upgrade

    url = f"sqlite:///{tmp_path_factory.mktemp('embedded') / 'imagegate.db'}"
    upgrade(url)
    engine = make_engine(url, pool_size=1)
    return AttemptStore(engine), new_key(engine)


def every_slot(claim, done):
    return list(range(claim.request["n"]))


def claimed(store, key_id, n: int = 1):
    return store.claim(make_task(store.engine, key_id, n=n), 1, worker="w1", lease_s=60, plan=every_slot)


def set_task(store, task_id, **values) -> None:
    with store.engine.begin() as connection:
        connection.execute(update(Task).where(Task.id == task_id).values(**values))


def test_a_claim_records_its_calls_and_a_second_delivery_is_refused_already_claimed(store, key_id):
    claim = claimed(store, key_id, n=3)
    assert claim.slots == (0, 1, 2) and claim.attempt == 1
    with store.engine.connect() as connection:
        slots = connection.scalars(select(Attempt.slot).where(Attempt.task_id == claim.task_id)).all()
    assert sorted(slots) == [0, 1, 2]
    assert store.claim(claim.task_id, 1, worker="w2", lease_s=60, plan=every_slot) is Refused.ALREADY_CLAIMED


def test_one_claim_wins_among_concurrent_claimers(store, key_id):
    task_id = make_task(store.engine, key_id)
    start = threading.Barrier(4)

    def claim(worker: str):
        start.wait()
        return store.claim(task_id, 1, worker=worker, lease_s=60, plan=every_slot)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(claim, [f"w{index}" for index in range(4)]))
    winners = [result for result in results if result]
    assert len(winners) == 1 and winners[0].task_id == task_id
    assert sorted(results[index] for index in range(4) if not results[index]) == [Refused.ALREADY_CLAIMED] * 3
    assert task_row(store.engine, task_id).worker == f"w{results.index(winners[0])}"


def test_claims_of_a_past_attempt_or_an_ended_or_missing_task_say_why(store, key_id):
    past = claimed(store, key_id)
    set_task(store, past.task_id, status=TaskStatus.PENDING)  # taken back: attempt 2 is next
    assert store.claim(past.task_id, 1, worker="w", lease_s=60, plan=every_slot) is Refused.STALE_ATTEMPT
    ended = make_task(store.engine, key_id, status=TaskStatus.SUCCEED, attempts=1)
    assert store.claim(ended, 2, worker="w", lease_s=60, plan=every_slot) is Refused.ALREADY_ENDED
    assert store.claim(uuid.uuid4(), 1, worker="w", lease_s=60, plan=every_slot) is Refused.NOT_FOUND


def test_a_stale_attempt_is_fenced_out_and_told_so(store, key_id):
    claim = claimed(store, key_id)
    # The sweeper took the attempt back and attempt 2 claimed it: attempt 1's writes change nothing.
    set_task(store, claim.task_id, status=TaskStatus.PENDING)
    assert store.claim(claim.task_id, 2, worker="w2", lease_s=60, plan=every_slot)
    assert store.fail(claim, BROKEN, []) is Refused.STALE_ATTEMPT
    assert store.retry_later(claim, BROKEN, [], countdown_s=1) is Refused.STALE_ATTEMPT
    assert store.wait_upstream(claim, "up-1", lease_s=60) is Refused.STALE_ATTEMPT
    assert store.succeed_many([Success(claim, [NewImage(PNG, "image/png")], None, [])]) == [Refused.STALE_ATTEMPT]
    row = task_row(store.engine, claim.task_id)
    assert (row.status, row.attempts, row.error_code) == (TaskStatus.RUNNING, 2, None)


def test_a_cancelled_attempt_may_only_fail_and_ends_cancelled(store, key_id):
    claim = claimed(store, key_id)
    set_task(store, claim.task_id, cancel_requested=True)
    assert store.retry_later(claim, BROKEN, [], countdown_s=1) is Refused.CANCELLED
    assert store.wait_upstream(claim, "up-1", lease_s=60) is Refused.CANCELLED
    assert store.end_cancelled(claim) is True
    row = task_row(store.engine, claim.task_id)
    assert (row.status, row.error_code) == (TaskStatus.FAILED, ErrorCode.CANCELLED)
    assert store.end_cancelled(claim) is Refused.ALREADY_ENDED
    assert store.fail(claim, BROKEN, []) is Refused.ALREADY_ENDED


def test_a_retry_goes_back_to_pending_for_the_next_attempt(store, key_id):
    claim = claimed(store, key_id)
    assert store.retry_later(claim, BROKEN, [], countdown_s=0, route="backup") is True
    row = task_row(store.engine, claim.task_id)
    assert (row.status, row.attempts, row.route, row.retries_used) == (TaskStatus.PENDING, 1, "backup", 0)
    assert store.claim(claim.task_id, 2, worker="w", lease_s=60, plan=every_slot)


def test_a_poll_step_is_taken_once(store, key_id):
    claim = claimed(store, key_id)
    assert store.wait_upstream(claim, "up-1", lease_s=60) is True
    polled = store.claim_poll(claim.task_id, 1, 1, lease_s=60)
    assert polled and polled.polls == 1 and polled.upstream_task_id == "up-1"
    assert store.claim_poll(claim.task_id, 1, 1, lease_s=60) is Refused.ALREADY_CLAIMED
    assert store.claim_poll(claim.task_id, 0, 2, lease_s=60) is Refused.STALE_ATTEMPT


def test_a_group_of_successes_writes_each_one_still_owned_and_says_why_not_for_the_rest(either):
    store, key_id = either
    mine, cancelled, taken_back = (claimed(store, key_id) for _ in range(3))
    set_task(store, cancelled.task_id, cancel_requested=True)
    set_task(store, taken_back.task_id, status=TaskStatus.PENDING)  # the sweeper gave this attempt away
    written = store.succeed_many(
        [
            Success(claim, [NewImage(PNG, "image/png")], {"total_tokens": 7}, [])
            for claim in (mine, cancelled, taken_back)
        ]
    )
    assert written == [True, Refused.CANCELLED, Refused.STALE_ATTEMPT]
    with store.engine.connect() as connection:
        rows = {row.id: row for row in connection.execute(select(Task.id, Task.status, Task.usage))}
        stored = connection.execute(select(Image.task_id)).scalars().all()
    assert rows[mine.task_id].status == "succeed" and rows[mine.task_id].usage == {"total_tokens": 7}
    assert rows[cancelled.task_id].status == "running" and rows[taken_back.task_id].status == "pending"
    assert mine.task_id in stored and cancelled.task_id not in stored and taken_back.task_id not in stored


def test_a_group_of_successes_ends_the_calls_and_stores_the_images_of_the_written_ones_only(either):
    store, key_id = either
    mine, taken_back = claimed(store, key_id, n=2), claimed(store, key_id, n=2)
    set_task(store, mine.task_id, usage={"total_tokens": 3})
    set_task(store, taken_back.task_id, status=TaskStatus.PENDING)
    images = [NewImage(PNG, "image/png", "a fox", slot=0), NewImage(PNG, "image/png", slot=1)]
    images += [NewImage(b"in the store", "image/webp", slot=1, key="kept/elsewhere")]
    calls = [CallOutcome(0, 200), CallOutcome(1, 201)]
    written = store.succeed_many([Success(claim, images, None, calls) for claim in (mine, taken_back)])
    assert written == [True, Refused.STALE_ATTEMPT]
    with store.engine.connect() as connection:
        ends = connection.execute(
            select(Attempt.task_id, Attempt.slot, Attempt.ended_at, Attempt.upstream_status).order_by(Attempt.slot)
        ).all()
        stored = connection.execute(
            select(Image.task_id, Image.slot, Image.index, Image.data, Image.store_key, Image.revised_prompt).order_by(
                Image.slot, Image.index
            )
        ).all()
        usage = connection.execute(select(Task.usage).where(Task.id == mine.task_id)).scalar_one()
    assert [(end.slot, end.upstream_status) for end in ends if end.task_id == mine.task_id] == [(0, 200), (1, 201)]
    assert all(end.ended_at is not None for end in ends if end.task_id == mine.task_id)
    assert [end.ended_at for end in ends if end.task_id == taken_back.task_id] == [None, None]
    assert [tuple(row[1:]) for row in stored if row.task_id == mine.task_id] == [
        (0, 0, PNG, None, "a fox"),
        (1, 0, PNG, None, None),
        (1, 1, None, "kept/elsewhere", None),
    ]
    assert not [row for row in stored if row.task_id == taken_back.task_id]
    assert usage == {"total_tokens": 3}  # a success without usage keeps what earlier attempts recorded


def test_in_a_group_holding_two_attempts_of_one_task_only_the_current_one_is_written(either):
    store, key_id = either
    stale = claimed(store, key_id)
    set_task(store, stale.task_id, status=TaskStatus.PENDING)  # taken back by the sweeper
    current = store.claim(stale.task_id, 2, worker="w2", lease_s=60, plan=every_slot)
    assert current

    def end(claim):
        return Success(claim, [NewImage(PNG + b"%d" % claim.attempt, "image/png")], None, [CallOutcome(0, 200)])

    written = store.succeed_many([end(stale), end(current)])
    assert written == [Refused.ALREADY_ENDED, True]  # why: read after the group, when attempt 2 has ended it
    with store.engine.connect() as connection:
        data = connection.scalars(select(Image.data).where(Image.task_id == stale.task_id)).all()
        calls = dict(
            connection.execute(select(Attempt.number, Attempt.ended_at).where(Attempt.task_id == stale.task_id)).all()
        )
    assert data == [PNG + b"2"]
    assert calls[1] is None and calls[2] is not None


def test_a_success_with_a_callback_commits_its_event_with_it_and_a_refused_one_none(either):
    store, key_id = either

    def with_callback():
        task_id = make_task(store.engine, key_id, callback_url="https://hooks.example/done")
        return store.claim(task_id, 1, worker="w1", lease_s=60, plan=every_slot)

    announced, refused, quiet = with_callback(), with_callback(), claimed(store, key_id)
    set_task(store, refused.task_id, status=TaskStatus.PENDING)
    ends = [
        Success(claim, [NewImage(PNG, "image/png")], None, [CallOutcome(0, 200)])
        for claim in (announced, refused, quiet)
    ]
    assert store.succeed_many(ends) == [True, Refused.STALE_ATTEMPT, True]
    with store.engine.connect() as connection:
        events = connection.execute(
            select(WebhookEvent.task_id, WebhookEvent.type).where(
                WebhookEvent.task_id.in_([announced.task_id, refused.task_id, quiet.task_id])
            )
        ).all()
        stored = set(connection.scalars(select(Image.task_id)))
    assert events == [(announced.task_id, "image.task.succeed")]
    assert {announced.task_id, quiet.task_id} <= stored and refused.task_id not in stored


def test_leases_are_renewed_only_for_attempts_still_held(store, key_id):
    held, lost = claimed(store, key_id), claimed(store, key_id)
    set_task(store, lost.task_id, status=TaskStatus.PENDING)
    before = {task_id: task_row(store.engine, task_id).lease_expires_at for task_id in (held.task_id, lost.task_id)}
    renewed = store.extend_leases([(held.task_id, 1), (lost.task_id, 1), (held.task_id, 2)], lease_s=600)
    assert renewed == 1
    assert task_row(store.engine, held.task_id).lease_expires_at > before[held.task_id]
    assert task_row(store.engine, lost.task_id).lease_expires_at == before[lost.task_id]
