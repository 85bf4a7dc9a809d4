"""Rows made directly in any state, for the state machine tests."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Engine, insert, select

from imagegate.app.db import make_sessionmaker
from imagegate.app.keys import create_key
from imagegate.app.models import ApiKey, Task, utcnow
from imagegate.app.state.tasks import new_task


def new_key(engine: Engine) -> uuid.UUID:
    name = f"state-{uuid.uuid4().hex[:8]}"
    create_key(make_sessionmaker(engine), name)
    with engine.connect() as connection:
        return connection.scalar(select(ApiKey.id).where(ApiKey.name == name))


def make_task(
    engine: Engine, key_id: uuid.UUID, *, n: int = 1, callback_url: str | None = None, **values: Any
) -> uuid.UUID:
    """A task as intake makes it, then set to `values` (status, attempts, ...) as a test needs."""
    row = (
        new_task(
            api_key_id=key_id,
            model="local",
            request={"model": "local", "prompt": "p", "n": n},
            response_format="b64_json",
            callback_url=callback_url,
            now=utcnow(),
        )
        | values
    )
    with engine.begin() as connection:
        connection.execute(insert(Task), row)
    return row["id"]


def task_row(engine: Engine, task_id: uuid.UUID):
    with engine.connect() as connection:
        return connection.execute(select(Task.__table__).where(Task.id == task_id)).one()
