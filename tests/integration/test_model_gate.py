"""The per-model limits' rules, on the shared gate (its Lua scripts in a real Redis) and on the
in-process gate of the embedded mode alike: concurrency slots with leases, the sliding minute of
`rpm`, the line that keeps older tasks first, and the slow-down and pause a 429 leaves.

The rate tests use a window of 1.5 s instead of a minute, so they run in seconds; the window's length
is a parameter of the gate, the rules are the same."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import pytest
import redis

from imagegate.app.providers import ModelConfig
from imagegate.app.state.tasks import QueuedReason
from imagegate.app.stores.attempts import Claim, Wait
from imagegate.workers.model_gate import Ask, Granted, NoRoom, RedisModelGate
from imagegate.workers.model_gate_local import LocalModelGate
from imagegate.workers.model_limiter import ModelLimiter

WINDOW_S = 1.5


@pytest.fixture(params=["redis", "local"])
def make_gate(request, redis_dbs):
    """Gates of one kind; the Redis ones keep their keys under a prefix of this test's own."""
    if request.param == "local":
        yield lambda window_s=WINDOW_S: LocalModelGate(window_s=window_s)
        return
    client = redis.Redis.from_url(redis_dbs[1])
    prefix = f"test-gate:{uuid.uuid4().hex}:"
    yield lambda window_s=WINDOW_S: RedisModelGate(client, prefix=prefix, window_s=window_s)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)


@pytest.fixture
def gate(make_gate):
    return make_gate()


ACCEPTED = 1_700_000_000_000


def ask(task: str, *, calls: int = 1, max_concurrency=None, rpm=None, order: int = 0, lease_s=30.0, wait_s=0.5):
    return Ask("m", task, calls, max_concurrency, rpm, ACCEPTED + order, lease_s, wait_s)


def test_no_more_calls_in_flight_than_max_concurrency_and_a_released_slot_is_taken_again(gate):
    first, second = gate.acquire(ask("a", max_concurrency=2)), gate.acquire(ask("b", max_concurrency=2, order=1))
    assert isinstance(first, Granted) and isinstance(second, Granted) and first.slots == second.slots == 1
    third = gate.acquire(ask("c", max_concurrency=2, order=2))
    assert isinstance(third, NoRoom) and third.reason == QueuedReason.MODEL_CONCURRENCY_LIMIT
    assert third.wait_s == pytest.approx(0.5)
    gate.release(first)
    assert isinstance(gate.acquire(ask("c", max_concurrency=2, order=2)), Granted)
    assert isinstance(gate.acquire(ask("d", max_concurrency=2, order=3)), NoRoom)


def test_asks_answered_together_are_answered_in_order_as_one_by_one(gate):
    answers = gate.acquire_many([ask(f"t{index}", max_concurrency=2, order=index) for index in range(3)])
    assert [type(answer) for answer in answers] == [Granted, Granted, NoRoom]
    assert answers[2].reason == QueuedReason.MODEL_CONCURRENCY_LIMIT
    gate.release(answers[0])
    assert isinstance(gate.acquire_many([ask("t2", max_concurrency=2, order=2)])[0], Granted)


def test_the_shared_gate_loads_its_script_again_after_redis_lost_it(redis_dbs):
    client = redis.Redis.from_url(redis_dbs[1])
    gate = RedisModelGate(client, prefix=f"test-gate:{uuid.uuid4().hex}:")
    assert isinstance(gate.acquire(ask("before", max_concurrency=1)), Granted)
    client.script_flush()  # what a restarted Redis has forgotten
    assert [type(answer) for answer in gate.acquire_many([ask("a"), ask("b", max_concurrency=1, order=1)])] == [
        Granted,
        NoRoom,
    ]


def test_a_fan_out_holds_a_slot_per_call_up_to_max_concurrency(gate):
    granted = gate.acquire(ask("a", calls=3, max_concurrency=2))
    assert isinstance(granted, Granted) and granted.slots == 2
    assert isinstance(gate.acquire(ask("b", max_concurrency=2, order=1)), NoRoom)


def test_slots_not_renewed_come_back_after_their_lease_and_renewed_ones_do_not(gate):
    dead = gate.acquire(ask("dead", max_concurrency=2, lease_s=0.4))
    alive = gate.acquire(ask("alive", max_concurrency=2, order=1, lease_s=0.4))
    assert isinstance(dead, Granted) and isinstance(alive, Granted)
    for _ in range(3):  # the living worker renews; the dead one cannot
        time.sleep(0.25)
        gate.renew("m", list(alive.holders), 0.4)
    assert isinstance(gate.acquire(ask("next", max_concurrency=2, order=2)), Granted)  # dead's slot is back
    assert isinstance(gate.acquire(ask("after", max_concurrency=2, order=3)), NoRoom)  # alive's is still held


def test_no_more_than_rpm_calls_in_any_window_and_the_wait_says_when_room_comes(gate):
    started = []
    for index in range(3):
        assert isinstance(gate.acquire(ask(f"t{index}", rpm=3, order=index)), Granted)
        started.append(time.monotonic())
        time.sleep(0.2)
    refused = gate.acquire(ask("late", rpm=3, order=9))
    assert isinstance(refused, NoRoom) and refused.reason == QueuedReason.MODEL_RATE_LIMIT
    # Room comes when the oldest call leaves the window.
    assert refused.wait_s == pytest.approx(started[0] + WINDOW_S - time.monotonic(), abs=0.15)
    time.sleep(refused.wait_s + 0.05)
    assert isinstance(gate.acquire(ask("late", rpm=3, order=9)), Granted)
    assert isinstance(gate.acquire(ask("later", rpm=3, order=10)), NoRoom)  # t1 and t2 are still in the window


def test_a_fan_out_takes_one_token_per_call(gate):
    assert isinstance(gate.acquire(ask("a", calls=3, rpm=4)), Granted)
    assert isinstance(gate.acquire(ask("b", calls=2, rpm=4, order=1)), NoRoom)
    assert isinstance(gate.acquire(ask("c", calls=1, rpm=4, order=2)), NoRoom)  # b is ahead and needs 2


def test_an_older_task_keeps_its_place_before_younger_ones_that_would_fit(gate):
    holding = [gate.acquire(ask(f"h{index}", max_concurrency=2, order=index)) for index in range(2)]
    old = gate.acquire(ask("old", calls=2, max_concurrency=2, order=10))
    assert isinstance(old, NoRoom) and old.position == 0
    gate.release(holding[0])
    young = gate.acquire(ask("young", max_concurrency=2, order=20))
    assert isinstance(young, NoRoom) and young.position == 1  # one slot is free, but it is the old task's
    gate.release(holding[1])
    assert isinstance(gate.acquire(ask("old", calls=2, max_concurrency=2, order=10)), Granted)


def test_a_place_in_line_lapses_when_its_task_stops_asking(gate):
    holder = gate.acquire(ask("h", max_concurrency=1, order=0))
    assert isinstance(gate.acquire(ask("gone", max_concurrency=1, order=1, wait_s=0.1)), NoRoom)
    gate.release(holder)
    assert isinstance(gate.acquire(ask("young", max_concurrency=1, order=2)), NoRoom)  # "gone" is ahead
    time.sleep(2.3)  # its place is kept for its wait and 2 s more
    assert isinstance(gate.acquire(ask("young", max_concurrency=1, order=2)), Granted)


def test_a_429_halves_the_rate_once_per_burst_and_pauses_for_retry_after(gate):
    assert gate.throttled("m", 8, cooldown_s=30, retry_after_s=0.5) == 4
    assert gate.throttled("m", 8, cooldown_s=30, retry_after_s=None) == 4  # the same burst: not halved again
    refused = gate.acquire(ask("a", rpm=8))
    assert isinstance(refused, NoRoom) and refused.reason == QueuedReason.MODEL_RATE_LIMIT
    assert 0.3 < refused.wait_s <= 0.5
    time.sleep(refused.wait_s + 0.05)
    # "a" kept its place in the line: it goes first, then the lowered rate (4 a minute) is spent.
    granted = [gate.acquire(ask(task, rpm=8, order=order)) for order, task in enumerate("abcde")]
    assert [isinstance(answer, Granted) for answer in granted] == [True] * 4 + [False]


def test_a_429_pauses_a_model_without_rpm_for_retry_after_and_lowers_nothing(gate):
    for index in range(6):
        assert isinstance(gate.acquire(ask(f"t{index}", order=index)), Granted)
    assert gate.throttled("m", None, cooldown_s=30, retry_after_s=0.4) == 0
    assert gate.throttled("m", None, cooldown_s=30, retry_after_s=5) == 0  # the same burst: no longer pause
    refused = gate.acquire(ask("next", order=10))
    assert isinstance(refused, NoRoom) and refused.reason == QueuedReason.MODEL_RATE_LIMIT
    time.sleep(refused.wait_s + 0.05)
    assert all(isinstance(gate.acquire(ask(f"u{index}", order=20 + index)), Granted) for index in range(6))
    assert isinstance(gate.acquire(ask("last", order=40)), Granted)


def test_the_slow_down_ends_after_the_cooldown(make_gate):
    gate = make_gate()
    assert gate.throttled("m", 2, cooldown_s=0.3, retry_after_s=None) == 1
    assert isinstance(gate.acquire(ask("a", rpm=2)), Granted)
    assert isinstance(gate.acquire(ask("b", rpm=2, order=1)), NoRoom)
    time.sleep(0.4)
    assert isinstance(gate.acquire(ask("b", rpm=2, order=1)), Granted)


def claim_of(task_id) -> Claim:
    now = datetime.now(UTC)
    return Claim(task_id, 1, "m", "m", 0, {}, None, None, now, 0, created_at=now)


def test_the_limiter_renews_the_slots_it_holds_and_gives_them_back(gate):
    limiter = ModelLimiter(gate, lease_s=0.6, wait_s=0.2, cooldown_s=30)
    config = ModelConfig(name="m", adapter="openai", base_url="http://x", max_concurrency=1)
    (held,) = limiter.admit_many([(config, claim_of(uuid.uuid4()), 1)])
    assert isinstance(held, Granted)
    time.sleep(1.0)  # past its lease: still held, as the limiter renews it
    second = claim_of(uuid.uuid4())
    (waiting,) = limiter.admit_many([(config, second, 1)])
    assert isinstance(waiting, Wait) and waiting.reason == QueuedReason.MODEL_CONCURRENCY_LIMIT
    assert 0.2 <= waiting.countdown_s <= 0.2 * 1.2 + 1e-6
    limiter.release(held)
    limiter.release(held)  # a second release does nothing
    assert isinstance(limiter.admit_many([(config, second, 1)])[0], Granted)
