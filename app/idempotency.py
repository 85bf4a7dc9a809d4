"""Idempotency-Key: the first request with a key wins; the same key and body later (or at the same
time) get the same task or batch; the same key with another body is refused.

The key row is inserted first, in the transaction that creates the task or batch, with
ON CONFLICT DO NOTHING: a concurrent duplicate waits on the unique index until the winner commits,
then finds its row. So twenty simultaneous posts make one task.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

from sqlalchemy import Connection, Row, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from imagegate.app.models import IdempotencyKey, utcnow


class IdempotencyMismatch(Exception):
    """The Idempotency-Key was used before with a different request body."""


def fingerprint(document: Any) -> str:
    """The same request in any key order or spacing has the same fingerprint."""
    return hashlib.sha256(json.dumps(document, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def insert_ignoring_conflict(session: Session | Connection, model: type, values: dict[str, Any]) -> bool:
    """INSERT ... ON CONFLICT DO NOTHING; True when the row was inserted."""
    bind = session if isinstance(session, Connection) else session.get_bind()
    dialect = postgresql if bind.dialect.name == "postgresql" else sqlite
    # RETURNING, not rowcount: drivers disagree on the rowcount of ON CONFLICT DO NOTHING.
    key = next(iter(model.__table__.primary_key.columns))
    statement = dialect.insert(model).values(**values).on_conflict_do_nothing().returning(key)
    return session.execute(statement).first() is not None


def reserve(
    session: Session | Connection,
    api_key_id: uuid.UUID,
    key: str,
    print_: str,
    *,
    task_id: uuid.UUID | None = None,
    batch_id: uuid.UUID | None = None,
) -> Row | None:
    """None when this request now owns the key (go on and create); else the earlier request's row.
    Raises IdempotencyMismatch when the earlier request had another body."""
    values = {
        "api_key_id": api_key_id,
        "key": key,
        "fingerprint": print_,
        "task_id": task_id,
        "batch_id": batch_id,
        "created_at": utcnow(),
    }
    if insert_ignoring_conflict(session, IdempotencyKey, values):
        return None
    earlier = session.execute(
        select(IdempotencyKey.__table__).where(IdempotencyKey.api_key_id == api_key_id, IdempotencyKey.key == key)
    ).one()
    if earlier.fingerprint != print_:
        raise IdempotencyMismatch(key)
    return earlier
