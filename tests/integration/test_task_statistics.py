"""A burst of new tasks does not turn each claim into a scan of every unfinished task.

With statistics taken while no task was unfinished, Postgres planned a claim (which finds its tasks
by id and guards their status) as a scan of every unfinished task, which the statistics said were
none: after a burst each claim read the whole backlog. The guards are now written so that no status
index can serve them (app/state/guards.py), and the tasks table is analyzed after every 1,000
changes (migrations/versions/0012) for the statements that do search by status. And a plan made
while the table was a few pages is not kept as the table grows: the worker's sessions price table
scans out (app/db.py)."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import psycopg
from sqlalchemy import create_engine, update
from sqlalchemy.dialects import postgresql

from imagegate.app.db import make_engine
from imagegate.app.migrate import upgrade
from imagegate.app.models import Task
from imagegate.app.state.attempts import _CLAIMABLE, _fence, claimable_each
from imagegate.app.stores.claim_groups import _CLAIM_WITH_CALLS
from tests.support.services import start_postgres

KEY = "00000000-0000-0000-0000-000000000001"
TASK_COLUMNS = (
    "id, api_key_id, model, status, request, response_format, attempts, route, retries_used, run_after, "
    "cancel_requested, polls, created_at, deleted"
)


def add_tasks(connection, count: int, status: str) -> None:
    connection.execute(
        f"INSERT INTO tasks ({TASK_COLUMNS}) SELECT gen_random_uuid(), %s, 'm', %s, '{{}}'::jsonb, 'b64_json', "
        "0, 'm', 0, now(), false, 0, now(), false FROM generate_series(1, %s)",
        (KEY, status, count),
    )


def a_backlog_the_statistics_have_not_seen(url: str, ended: int, pending: int) -> list[uuid.UUID]:
    """`ended` tasks, analyzed; then `pending` more. Returns the ids of 8 pending ones."""
    with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as connection:
        connection.execute(
            "INSERT INTO api_keys (id, name, prefix, key_hash, created_at) VALUES (%s, 'k', 'ig_x', 'h', now())",
            (KEY,),
        )
        add_tasks(connection, ended, "succeed")
        connection.execute("ANALYZE tasks")  # statistics with no unfinished task
        add_tasks(connection, pending, "pending")
        return [row[0] for row in connection.execute("SELECT id FROM tasks WHERE status = 'pending' LIMIT 8")]


def indexes_read(plan: dict) -> set[str]:
    found = {plan["Index Name"]} if "Index Name" in plan else set()
    for child in plan.get("Plans", ()):
        found |= indexes_read(child)
    return found


def planned_indexes(engine, statement, params: dict | None = None) -> set[str]:
    compiled = statement.compile(dialect=postgresql.psycopg.dialect())
    with engine.connect() as connection:
        (plan,) = connection.exec_driver_sql(
            f"EXPLAIN (FORMAT JSON) {compiled}", compiled.params | (params or {})
        ).scalar()
    return indexes_read(plan["Plan"])


def test_claims_and_transitions_look_their_tasks_up_by_id_whatever_the_statistics_say(own_database):
    engine = create_engine(own_database)
    with engine.begin() as connection:  # autovacuum must not refresh the statistics meanwhile
        connection.exec_driver_sql("ALTER TABLE tasks SET (autovacuum_enabled = false)")
    pending = a_backlog_the_statistics_have_not_seen(own_database, ended=5_000, pending=30_000)
    asked = {"asked_id": pending, "asked_attempt": [1] * len(pending)}
    claim = {"worker": "w", "started_at": None, "lease_until": None}
    calls = {"calls_task_id": [], "calls_slot": [], "calls_model": []}
    fenced = update(Task.__table__).where(*_fence(pending[0], 1)).values(lease_expires_at=datetime.now(UTC))
    try:
        assert planned_indexes(engine, _CLAIMABLE, asked) == {"tasks_pkey"}
        assert planned_indexes(engine, _CLAIM_WITH_CALLS, asked | claim | calls) == {"tasks_pkey"}
        assert planned_indexes(engine, fenced) == {"tasks_pkey"}
    finally:
        engine.dispose()


def test_the_tasks_table_is_analyzed_after_a_burst_smaller_than_a_tenth_of_it():
    server = start_postgres("autovacuum_naptime=1")  # autovacuum looks every second (a minute by default)
    try:
        url = f"{server.url}/postgres"
        upgrade(url)
        a_backlog_the_statistics_have_not_seen(url, ended=400_000, pending=30_000)  # 7.5% of the table
        with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as connection:
            deadline = time.monotonic() + 15
            analyzed = False
            while not analyzed and time.monotonic() < deadline:
                time.sleep(0.5)
                analyzed = connection.execute(
                    "SELECT last_autoanalyze IS NOT NULL FROM pg_stat_user_tables WHERE relname = 'tasks'"
                ).fetchone()[0]
        assert analyzed, "autovacuum did not analyze the tasks table within 15 s of 30,000 new tasks"
    finally:
        server.stop()


def test_a_claim_planned_on_a_young_table_still_finds_its_tasks_by_id_once_the_table_has_grown(own_database):
    """The worker's statements are prepared, and Postgres keeps the plan it made while the table was
    a few pages (a scan, cheapest then) until the table is next analyzed: each claim then read every
    task, more with every task added, for up to a minute after a fresh start."""
    engine = make_engine(own_database, pool_size=1, max_overflow=0, by_key_only=True)  # as the worker's
    with psycopg.connect(own_database.replace("+psycopg", ""), autocommit=True) as setup:
        setup.execute("ALTER TABLE tasks SET (autovacuum_enabled = false)")
        a_backlog_the_statistics_have_not_seen(own_database, ended=0, pending=8)
        asks = [(row[0], 1) for row in setup.execute("SELECT id FROM tasks")]
    try:
        with engine.connect() as connection:
            for _ in range(12):  # prepared after 5 runs; its generic plan chosen after 5 more
                assert len(claimable_each(connection, asks)) == 8
                connection.commit()  # psycopg forgets what it prepared in a rolled-back transaction
            with psycopg.connect(own_database.replace("+psycopg", ""), autocommit=True) as setup:
                add_tasks(setup, 20_000, "pending")
            before = _scans_of_tasks(connection)
            assert len(claimable_each(connection, asks)) == 8
            assert _scans_of_tasks(connection) == before
    finally:
        engine.dispose()


def _scans_of_tasks(connection) -> int:
    """Sequential scans of tasks by this connection's process (counted before they are reported)."""
    return connection.exec_driver_sql("SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relname = 'tasks'").scalar()
