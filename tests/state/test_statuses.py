"""Each machine's statuses are exactly what the database allows: the CHECK constraints of migration
0002 mirror the enums of app/state/*, and a status outside them is refused by Postgres itself."""

from __future__ import annotations

import re
from enum import StrEnum

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from imagegate.app.state.batches import BatchStatus
from imagegate.app.state.tasks import TaskStatus
from imagegate.app.state.webhook_events import EventStatus
from tests.state.rows import make_task

MACHINES = {"tasks": TaskStatus, "batches": BatchStatus, "webhook_events": EventStatus}


@pytest.mark.parametrize("table", MACHINES)
def test_the_database_allows_exactly_the_enum(engine, table):
    with engine.connect() as connection:
        definition, valid = connection.execute(
            text("SELECT pg_get_constraintdef(oid), convalidated FROM pg_constraint WHERE conname = :name"),
            {"name": f"ck_{table}_status"},
        ).one()
    enum: type[StrEnum] = MACHINES[table]
    assert valid and set(re.findall(r"'([^']*)'", definition)) == {status.value for status in enum}


def test_a_status_outside_the_enum_is_refused(engine, key_id):
    task_id = make_task(engine, key_id)
    with pytest.raises(IntegrityError, match="ck_tasks_status"), engine.begin() as connection:
        connection.execute(text("UPDATE tasks SET status = 'cancelled' WHERE id = :id"), {"id": task_id})
