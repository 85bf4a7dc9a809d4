"""Ordinary failures of a command (no schema yet, a database or broker that does not answer) as
one line for the terminal. Only the driver's own first line is shown: SQLAlchemy's full message
carries the statement's parameters, which may be a new key's hash or webhook secret."""

from __future__ import annotations

import sys

UPGRADE_HINT = "run `imagegate db upgrade`"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__


def _database(exc) -> str:
    detail = _first_line(exc.orig) if exc.orig is not None else type(exc).__name__
    lowered = detail.lower()
    if "no such table" in lowered or ("relation" in lowered and "does not exist" in lowered):
        return f"the database has no imagegate schema yet ({detail}): {UPGRADE_HINT}"
    if "database" in lowered and "does not exist" in lowered:
        return f"{detail}: create it (createdb NAME) or point IMAGEGATE_DATABASE_URL at another"
    if "column" in lowered and ("does not exist" in lowered or "no such column" in lowered):
        return f"the database schema is older than this imagegate ({detail}): {UPGRADE_HINT}"
    return f"the database does not answer as expected: {detail} (check IMAGEGATE_DATABASE_URL)"


def explain(exc: BaseException) -> str | None:
    """One line saying what went wrong and what to do, or None for anything else (a bug: let it show)."""
    import kombu.exceptions
    import redis
    from sqlalchemy.exc import InterfaceError, OperationalError, ProgrammingError

    alembic_util = sys.modules.get("alembic.util")  # loaded if the failure is a migration's

    if isinstance(exc, (OperationalError, ProgrammingError, InterfaceError)):
        return _database(exc)
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, kombu.exceptions.OperationalError)):
        return f"the broker does not answer: {_first_line(exc)} (check IMAGEGATE_BROKER_URL)"
    if alembic_util is not None and isinstance(exc, alembic_util.CommandError):
        return f"migrations: {_first_line(exc)}"
    return None
