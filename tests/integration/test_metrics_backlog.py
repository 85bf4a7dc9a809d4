"""What the sweeper's metrics endpoint reads at scrape time (live tasks, queue depth, processes seen)
and what it counts of its passes, on a database and a redis-server of this test's own: exact counts."""

from __future__ import annotations

import uuid
from datetime import timedelta

import redis
from prometheus_client import REGISTRY, CollectorRegistry
from sqlalchemy import create_engine, text

from imagegate.app.db import make_engine, make_sessionmaker
from imagegate.app.heartbeats import Heart
from imagegate.app.keys import create_key
from imagegate.app.metrics import BacklogCollector
from imagegate.app.models import utcnow
from imagegate.app.queue import QUEUE
from imagegate.app.sweeper import make_sweeper


def overdue_pending_tasks(database_url: str, count: int, model: str) -> None:
    create_key(make_sessionmaker(make_engine(database_url, pool_size=1)), "metrics")
    engine = create_engine(database_url)
    long_ago = utcnow() - timedelta(minutes=5)
    with engine.begin() as connection:
        key_id = connection.execute(text("SELECT id FROM api_keys")).scalar_one()
        connection.execute(
            text(
                "INSERT INTO tasks (id, api_key_id, model, status, request, response_format, attempts, route,"
                " retries_used, run_after, cancel_requested, polls, created_at) VALUES"
                " (:id, :key, :model, 'pending', '{\"prompt\": \"x\"}', 'url', 0, :model, 0, :at, false, 0, :at)"
            ),
            [{"id": uuid.uuid4(), "key": key_id, "model": model, "at": long_ago} for _ in range(count)],
        )
    engine.dispose()


def republished() -> float:
    return REGISTRY.get_sample_value("imagegate_sweeper_actions_total", {"action": "republished"}) or 0.0


def test_the_backlog_is_read_at_scrape_time_and_the_sweeper_counts_what_it_republished(
    settings, own_database, own_redis
):
    settings = settings.model_copy(
        update={"database_url": own_database, "broker_url": f"{own_redis.url}/0", "republish_after_s": 30.0}
    )
    overdue_pending_tasks(own_database, 3, "local")
    sweeper = make_sweeper(settings)
    Heart(sweeper.runtime.engine, "worker").beat()
    registry = CollectorRegistry()
    registry.register(BacklogCollector(sweeper.runtime.engine, sweeper.broker))
    assert registry.get_sample_value("imagegate_tasks", {"model": "local", "status": "pending"}) == 3
    assert registry.get_sample_value("imagegate_queue_messages", {"queue": QUEUE}) == 0
    assert registry.get_sample_value("imagegate_processes_seen", {"kind": "worker"}) == 1
    assert registry.get_sample_value("imagegate_processes_seen", {"kind": "sweeper"}) == 0

    before = republished()
    assert sweeper.sweep_once().republished == 3  # no message was ever published: all three were lost
    assert republished() == before + 3
    assert registry.get_sample_value("imagegate_queue_messages", {"queue": QUEUE}) == 3
    assert redis.Redis.from_url(settings.broker_url).llen(QUEUE) == 3


def test_a_scrape_during_an_outage_answers_what_it_could_read(settings, own_database):
    registry = CollectorRegistry()
    broker = redis.Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=1)  # nothing listens there
    registry.register(BacklogCollector(make_engine(own_database, pool_size=1), broker))
    assert registry.get_sample_value("imagegate_processes_seen", {"kind": "worker"}) == 0
    assert registry.get_sample_value("imagegate_queue_messages", {"queue": QUEUE}) is None
