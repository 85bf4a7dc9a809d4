"""Engine and session factory, made from settings on demand."""

from __future__ import annotations

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

# Below the idle timeouts of common proxies and firewalls (PgBouncer, cloud NATs drop at ~350 s).
POOL_RECYCLE_S = 300


def make_engine(
    database_url: str,
    *,
    pool_size: int = 10,
    max_overflow: int | None = None,
    pre_ping: bool = True,
    by_key_only: bool = False,
) -> Engine:
    """pre_ping=False (the API) saves a `SELECT 1` round trip per checkout: connections are recycled
    after POOL_RECYCLE_S instead, and one found dead (Postgres restarted) fails that request with
    an OperationalError, answered 503, and invalidates the whole pool so the next request reconnects.
    max_overflow defaults to twice pool_size; an overflow connection is closed when returned.
    by_key_only: see _no_table_scans."""
    if database_url.startswith("sqlite"):
        engine = create_engine(database_url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            # WAL lets the API read while the worker writes; foreign keys are off by default.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    # A short connect timeout: with Postgres down, answer 503 quickly instead of hanging.
    engine = create_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=pool_size * 2 if max_overflow is None else max_overflow,
        pool_pre_ping=pre_ping,
        pool_recycle=POOL_RECYCLE_S,
        connect_args={"connect_timeout": 5},
    )
    if engine.dialect.driver == "psycopg":
        event.listen(engine, "connect", _arrays_in_binary)
    if by_key_only:
        event.listen(engine, "connect", _no_table_scans)
    return engine


def _no_table_scans(dbapi_connection, _record) -> None:
    """For a process whose statements all find their rows through an index (the worker: by id, or
    by an indexed column). Its statements are prepared, and Postgres keeps the plan it made for a
    prepared statement until the table is next analyzed: made while `tasks` was a few pages, a
    claim's plan read the whole table, and went on doing so as the table grew (each sync request
    paid ~1 ms of Postgres CPU within a minute of a fresh start). With table scans priced out, that
    plan is the index lookup at any size; a statement with no index to use still scans. A SET on
    connect, not a startup option, which PgBouncer refuses."""
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SET enable_seqscan = off")
    dbapi_connection.commit()


def _arrays_in_binary(dbapi_connection, _record) -> None:
    """Lists go to Postgres as binary arrays. psycopg writes them as text by default, quoting every
    element in Python: for the one-array-per-column statements (a batch's 10,000 tasks, a group's
    claims) that was 4x slower, and a third of a batch's intake CPU."""
    from psycopg.types.array import ListBinaryDumper

    dbapi_connection.adapters.register_dumper(list, ListBinaryDumper)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
