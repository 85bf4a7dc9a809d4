"""The sweeper republishes only what a Redis broker really lost (issue 8: a backlog drained with
3,665 extra messages). A database and a redis-server of this test's own: the counts are exact."""

from __future__ import annotations

import json
import time
import uuid
from datetime import timedelta

import redis
from sqlalchemy import create_engine, text

from imagegate.app.db import make_engine, make_sessionmaker
from imagegate.app.keys import create_key
from imagegate.app.models import utcnow
from imagegate.app.queue import QUEUE, RunPublisher, make_celery
from imagegate.app.sweeper import make_sweeper


def pending_tasks(database_url: str, count: int, overdue_s: float) -> list[uuid.UUID]:
    key = create_key(make_sessionmaker(make_engine(database_url, pool_size=1)), "sweeper").key
    engine = create_engine(database_url)
    ids = [uuid.uuid4() for _ in range(count)]
    with engine.begin() as connection:
        key_id = connection.execute(text("SELECT id FROM api_keys")).scalar_one()
        connection.execute(
            text(
                "INSERT INTO tasks (id, api_key_id, model, status, request, response_format, attempts, route,"
                " retries_used, run_after, cancel_requested, polls, created_at) VALUES"
                " (:id, :key, 'local', 'pending', '{\"prompt\": \"x\"}', 'url', 0, 'local', 0, :run_after, false, 0,"
                " :run_after)"
            ),
            [
                {"id": task_id, "key": key_id, "run_after": utcnow() - timedelta(seconds=overdue_s + index * 0.001)}
                for index, task_id in enumerate(ids)
            ],
        )
    engine.dispose()
    assert key
    return ids


def test_overdue_tasks_whose_messages_are_queued_are_not_republished(settings, own_database, own_redis):
    settings = settings.model_copy(
        update={"database_url": own_database, "broker_url": f"{own_redis.url}/0", "republish_after_s": 30.0}
    )
    broker = redis.Redis.from_url(settings.broker_url)
    ids = pending_tasks(own_database, 300, overdue_s=120)
    RunPublisher(make_celery(settings)).publish_all(ids)  # no worker runs: the messages wait in the queue
    assert broker.llen(QUEUE) == 300
    sweeper = make_sweeper(settings)

    assert sweeper.sweep_once().republished == 0
    assert broker.llen(QUEUE) == 300

    broker.ltrim(QUEUE, 0, 249)  # 50 messages lost
    assert sweeper.sweep_once().republished == 50
    assert broker.llen(QUEUE) == 300

    broker.flushall()  # this redis-server is the test's own
    assert sweeper.sweep_once().republished == 300 - 50  # the 50 just republished are not overdue yet
    assert broker.llen(QUEUE) == 250


def test_unacknowledged_messages_count_only_while_their_task_waits(settings, own_database, own_redis):
    settings = settings.model_copy(
        update={"database_url": own_database, "broker_url": f"{own_redis.url}/0", "republish_after_s": 30.0}
    )
    broker = redis.Redis.from_url(settings.broker_url)
    celery = make_celery(settings)
    ids = pending_tasks(own_database, 20, overdue_s=120)
    RunPublisher(celery).publish_all(ids)

    # What kombu does when a worker takes a message: out of the list, into the `unacked` hash, and
    # its delivery time into the `unacked_index` sorted set.
    def take(tag: str, message: bytes, delivered_at: float) -> None:
        take_message(broker, tag, message, delivered_at)

    for index in range(5):
        take(f"taken-{index}", broker.rpop(QUEUE), time.time())
    sweeper = make_sweeper(settings)
    assert sweeper.sweep_once().republished == 0

    # Entries an ack never removed, of tasks long ended (seen after a Redis restart), hide nothing.
    RunPublisher(celery).publish_all([uuid.uuid4() for _ in range(3)])
    for index in range(3):
        take(f"stale-{index}", broker.lpop(QUEUE), time.time())
    broker.rpop(QUEUE, 3)  # and three messages of waiting tasks are lost
    assert broker.llen(QUEUE) == 12 and broker.hlen("unacked") == 8
    assert sweeper.sweep_once().republished == 3


def take_message(broker, tag: str, message: bytes, delivered_at: float) -> None:
    """What kombu does when a worker reserves a message: it leaves the list for the `unacked` hash,
    and its delivery time goes into the `unacked_index` sorted set."""
    broker.hset("unacked", tag, json.dumps([json.loads(message), "", QUEUE]))
    broker.zadd("unacked_index", {tag: delivered_at})


def test_messages_a_killed_worker_had_reserved_count_no_longer_than_republish_after(settings, own_database, own_redis):
    """They stay in the hash until the visibility timeout (an hour); their tasks must not wait that long."""
    settings = settings.model_copy(
        update={"database_url": own_database, "broker_url": f"{own_redis.url}/0", "republish_after_s": 30.0}
    )
    broker = redis.Redis.from_url(settings.broker_url)
    RunPublisher(make_celery(settings)).publish_all(pending_tasks(own_database, 10, overdue_s=120))
    for index in range(10):
        take_message(broker, f"reserved-{index}", broker.rpop(QUEUE), time.time() - 60)
    assert broker.llen(QUEUE) == 0
    assert make_sweeper(settings).sweep_once().republished == 10
