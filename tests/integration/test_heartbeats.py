"""Heartbeats on real Postgres: one row per process, rewritten in place; recent ones found by time;
the real worker writes its own."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import create_engine, func, select, update

from imagegate.app.heartbeats import Heart, forget_old, recent
from imagegate.app.models import Heartbeat, utcnow
from tests.support.services import wait_until


def test_a_process_keeps_one_row_and_old_ones_are_forgotten(own_database):
    engine = create_engine(own_database)
    heart = Heart(engine, "sweeper", {"interval_s": 5})
    heart.beat()
    first = recent(engine, kind="sweeper")[0].seen_at
    heart.beat()
    [seen] = recent(engine, kind="sweeper")
    assert seen.seen_at > first and seen.info == {"interval_s": 5} and seen.pid == heart.pid
    assert recent(engine, kind="worker") == []

    with engine.begin() as connection:  # the process died two days ago
        connection.execute(update(Heartbeat).values(seen_at=utcnow() - timedelta(days=2)))
    assert recent(engine, within_s=60) == []
    assert forget_old(engine) == 1
    with engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(Heartbeat)) == 0


def test_the_running_worker_is_seen(worker, database_url):
    engine = create_engine(database_url)
    seen = wait_until(lambda: recent(engine, kind="worker"), 30, "the worker's heartbeat")
    assert seen[0].info["concurrency"] == 100
