"""Wake-ups on a real Redis (app/wakeups.py): an announced end wakes the request waiting on that
task alone, and a reply handed over with the end is taken once, by the woken request, and does not
stay in Redis for long if nobody takes it."""

from __future__ import annotations

import uuid

import redis

from imagegate.app.wakeups import REPLY_TTL_MS, RedisWakeups


def test_an_end_wakes_its_waiter_with_its_reply_taken_once(redis_dbs):
    wakeups = RedisWakeups(redis_dbs[1])
    mine, other = str(uuid.uuid4()), str(uuid.uuid4())
    try:
        with wakeups.subscription(mine) as waiting, wakeups.subscription(other) as not_woken:
            waiting.wait(0.5)  # the listener subscribes, then wakes every waiter once: let that pass
            not_woken.wait(0.01)
            wakeups.announce_many([mine], {mine: b'{"data": []}'})
            assert waiting.wait(5)
            assert not not_woken.wait(0.2)
        assert wakeups.take_reply(mine) == b'{"data": []}'
        assert wakeups.take_reply(mine) is None
        assert wakeups.take_reply(other) is None
    finally:
        wakeups.close()


def test_a_reply_nobody_takes_expires(redis_dbs):
    wakeups = RedisWakeups(redis_dbs[1])
    task_id = str(uuid.uuid4())
    try:
        wakeups.announce(task_id, b"{}")
        ttl_ms = redis.Redis.from_url(redis_dbs[1]).pttl(f"imagegate:reply:{task_id}")
        assert 0 < ttl_ms <= REPLY_TTL_MS
        wakeups.announce(str(uuid.uuid4()))  # an end without a reply puts nothing
        assert wakeups.take_reply(task_id) == b"{}"
    finally:
        wakeups.close()


def test_a_redis_that_fails_gives_no_reply_not_an_error():
    wakeups = RedisWakeups("redis://127.0.0.1:1/0")  # nothing listens there
    assert wakeups.take_reply(str(uuid.uuid4())) is None
