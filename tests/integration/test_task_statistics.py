"""A burst of new tasks does not turn each claim into a scan of every unfinished task
(migrations/versions/0012): on a Postgres whose autovacuum runs, the tasks table is analyzed after
1,000 changes, so once a burst far smaller than a tenth of the table has come in, a claim is still
planned as a lookup by primary key.

With the statistics taken when no task was unfinished, Postgres planned a claim as a scan of the
unfinished tasks (they looked like none): every claim then read all of them."""

from __future__ import annotations

import time

import psycopg
from sqlalchemy import create_engine
from sqlalchemy.dialects import postgresql

from imagegate.app.migrate import upgrade
from imagegate.app.state.attempts import _CLAIMABLE
from imagegate.app.stores.claim_groups import _CLAIM_WITH_CALLS
from tests.support.services import start_postgres

TASK_COLUMNS = (
    "id, api_key_id, model, status, request, response_format, attempts, route, retries_used, run_after, "
    "cancel_requested, polls, created_at, deleted"
)


def add_tasks(connection, count: int, status: str) -> None:
    connection.execute(
        f"INSERT INTO tasks ({TASK_COLUMNS}) SELECT gen_random_uuid(), %s, 'm', %s, '{{}}'::jsonb, 'b64_json', "
        "0, 'm', 0, now(), false, 0, now(), false FROM generate_series(1, %s)",
        ("00000000-0000-0000-0000-000000000001", status, count),
    )


def indexes_read(plan: dict) -> set[str]:
    found = {plan["Index Name"]} if "Index Name" in plan else set()
    for child in plan.get("Plans", ()):
        found |= indexes_read(child)
    return found


def planned_indexes(engine, statement, params: dict) -> set[str]:
    compiled = statement.compile(dialect=postgresql.psycopg.dialect())
    with engine.connect() as connection:
        (plan,) = connection.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {compiled}", compiled.params | params).scalar()
    return indexes_read(plan["Plan"])


def test_a_claim_after_a_burst_of_new_tasks_is_a_lookup_by_primary_key():
    server = start_postgres("autovacuum_naptime=1")
    try:
        url = f"{server.url}/postgres"
        upgrade(url)
        with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as connection:
            connection.execute(
                "INSERT INTO api_keys (id, name, prefix, key_hash, created_at) "
                "VALUES ('00000000-0000-0000-0000-000000000001', 'k', 'ig_x', 'h', now())"
            )
            add_tasks(connection, 400_000, "succeed")
            connection.execute("ANALYZE tasks")  # statistics with no unfinished task
            add_tasks(connection, 30_000, "pending")  # 7.5% of the table: a backlog
            pending = [row[0] for row in connection.execute("SELECT id FROM tasks WHERE status = 'pending' LIMIT 8")]
            # Autovacuum looks every second here (a minute by default): give it a few rounds.
            deadline = time.monotonic() + 15
            while (
                time.monotonic() < deadline
                and not connection.execute(
                    "SELECT last_autoanalyze IS NOT NULL FROM pg_stat_user_tables WHERE relname = 'tasks'"
                ).fetchone()[0]
            ):
                time.sleep(0.5)

        engine = create_engine(url)
        asked = {"asked_id": pending, "asked_attempt": [1] * len(pending)}
        assert planned_indexes(engine, _CLAIMABLE, asked) == {"tasks_pkey"}
        claim = {"worker": "w", "started_at": None, "lease_until": None}
        calls = {"calls_task_id": [], "calls_slot": [], "calls_model": []}
        assert planned_indexes(engine, _CLAIM_WITH_CALLS, asked | claim | calls) == {"tasks_pkey"}
        engine.dispose()
    finally:
        server.stop()
