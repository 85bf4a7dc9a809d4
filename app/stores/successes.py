"""Writing a group of successes: the tasks' guarded running -> succeed, their usage, the end of
their calls and their image rows, the records written only for an attempt whose transition was.

On Postgres it is one statement (data-modifying CTEs on `succeed_from`, joined on its RETURNING):
a lone success was six round trips (BEGIN, the transition, the usage, the calls, the images,
COMMIT), a third of its CPU in the worker. Elsewhere (the embedded mode's SQLite) it is a
statement each.

The image bytes are bound one parameter per image: bound as one bytea[] array, a 150 KB image made
the write three times dearer for the worker and for Postgres (measured). The statement has room for
a power of two of images, the rest bound NULL and never read: a statement per image count was one
built, compiled and planned anew for most groups while a worker warmed up on a backlog."""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Integer, LargeBinary, Text, Uuid, bindparam, cast, func, insert, select, update
from sqlalchemy.dialects.postgresql import array

from imagegate.app.models import Attempt, Image, Task
from imagegate.app.state import attempts as transitions
from imagegate.app.state.refused import Outcome

if TYPE_CHECKING:
    from imagegate.app.stores.attempts import Claim, NewImage, Success

tasks, attempts, images = Task.__table__, Attempt.__table__, Image.__table__

# The `images` columns a new image row sets from its own arrays (its bytes come apart; created_at
# is the success's time).
_IMAGE_COLUMNS = {
    "id": Uuid,
    "task_id": Uuid,
    "slot": Integer,
    "index": Integer,
    "content_type": Text,
    "store_key": Text,
    "revised_prompt": Text,
}


@functools.cache
def _statement(image_count: int):
    held = transitions.arrays_as_rows("held", id=Uuid, attempt=Integer, usage=Text)
    done = (
        transitions.succeed_from(held)
        .values(usage=func.coalesce(cast(held.c.usage, tasks.c.usage.type), tasks.c.usage))
        .cte("done")
    )
    calls = transitions.arrays_as_rows("calls", id=Uuid, attempt=Integer, slot=Integer, upstream_status=Integer)
    ended = (
        update(attempts)
        .where(
            attempts.c.task_id == calls.c.id,
            attempts.c.number == calls.c.attempt,
            attempts.c.slot == calls.c.slot,
            calls.c.id == done.c.id,
            calls.c.attempt == done.c.attempts,
        )
        .values(
            ended_at=transitions.FINISHED_AT,
            error_code=None,
            error_message=None,
            upstream_status=calls.c.upstream_status,
        )
        .cte("ended")
    )
    statement = select(done.c.id, done.c.attempts).add_cte(ended)
    if not image_count:
        return statement
    new = transitions.arrays_as_rows("new", attempt=Integer, **_IMAGE_COLUMNS, ordinality="position")
    data = array([cast(bindparam(f"data_{index}"), LargeBinary) for index in range(image_count)])
    stored = (
        insert(images)
        .from_select(
            [*_IMAGE_COLUMNS, "data", "created_at"],
            select(*(new.c[name] for name in _IMAGE_COLUMNS), data[new.c.position], transitions.FINISHED_AT).where(
                new.c.task_id == done.c.id, new.c.attempt == done.c.attempts
            ),
        )
        .cte("stored")
    )
    return statement.add_cte(stored)


def write_successes(
    connection: Connection, ends: Sequence[Success], now: datetime
) -> dict[tuple[uuid.UUID, int], Outcome]:
    """For each (task, attempt) of these successes, True where written, else why not."""
    if connection.dialect.name != "postgresql":
        return _succeed_each(connection, ends, now)
    stored = [(end.claim.attempt, row) for end in ends for row in image_rows(end.claim, end.images, now)]
    room = _room_for(len(stored))
    rows = connection.execute(_statement(room), _parameters(ends, now, stored, room))
    written = {(row.id, row.attempts) for row in rows}
    held = [(end.claim.task_id, end.claim.attempt) for end in ends]
    refused = [pair for pair in held if pair not in written]
    return dict.fromkeys(written, True) | (transitions.why_refused_each(connection, refused) if refused else {})


def _room_for(image_count: int) -> int:
    """How many images the statement for `image_count` images has room for: 0, or a power of two."""
    return 0 if image_count == 0 else 1 << (image_count - 1).bit_length()


def _parameters(
    ends: Sequence[Success], now: datetime, stored: list[tuple[int, dict[str, Any]]], room: int
) -> dict[str, Any]:
    calls = [(end.claim, outcome) for end in ends for outcome in end.outcomes]
    return {
        "finished_at": now,
        "held_id": [end.claim.task_id for end in ends],
        "held_attempt": [end.claim.attempt for end in ends],
        "held_usage": [None if end.usage is None else json.dumps(end.usage) for end in ends],
        "calls_id": [claim.task_id for claim, _ in calls],
        "calls_attempt": [claim.attempt for claim, _ in calls],
        "calls_slot": [outcome.slot for _, outcome in calls],
        "calls_upstream_status": [outcome.upstream_status for _, outcome in calls],
        "new_attempt": [attempt for attempt, _ in stored],
        **{f"new_{name}": [row[name] for _, row in stored] for name in _IMAGE_COLUMNS},
        **{f"data_{index}": stored[index][1]["data"] if index < len(stored) else None for index in range(room)},
    }


def _succeed_each(
    connection: Connection, ends: Sequence[Success], now: datetime
) -> dict[tuple[uuid.UUID, int], Outcome]:
    """The portable form (the embedded mode's SQLite): each transition, then the written ones' usage,
    calls and images, a statement each."""
    by_attempt = transitions.succeed_each(connection, [(end.claim.task_id, end.claim.attempt) for end in ends], now)
    mine = [end for end in ends if by_attempt[end.claim.task_id, end.claim.attempt] is True]
    usages = [{"tid": end.claim.task_id, "usage_": end.usage} for end in mine if end.usage is not None]
    if usages:
        connection.execute(
            update(tasks)
            .where(tasks.c.id == bindparam("tid"))
            .values(usage=bindparam("usage_", type_=tasks.c.usage.type)),
            usages,
        )
    outcomes = [
        {
            "tid": end.claim.task_id,
            "attempt_": end.claim.attempt,
            "slot_": outcome.slot,
            "upstream_status": outcome.upstream_status,
        }
        for end in mine
        for outcome in end.outcomes
    ]
    if outcomes:
        connection.execute(
            update(attempts)
            .where(
                attempts.c.task_id == bindparam("tid"),
                attempts.c.number == bindparam("attempt_"),
                attempts.c.slot == bindparam("slot_"),
            )
            .values(ended_at=now, error_code=None, error_message=None),
            outcomes,
        )
    rows = [row for end in mine for row in image_rows(end.claim, end.images, now)]
    if rows:
        connection.execute(insert(images), rows)
    return by_attempt


def image_rows(claim: Claim, new_images: Sequence[NewImage], now: datetime) -> list[dict[str, Any]]:
    """The `images` rows of an attempt's new images, numbered within each fan-out slot."""
    indexes: dict[int, int] = {}
    rows = []
    for image in new_images:
        index = indexes[image.slot] = indexes.get(image.slot, -1) + 1
        rows.append(
            {
                "id": image.id,
                "task_id": claim.task_id,
                "slot": image.slot,
                "index": index,
                "content_type": image.content_type,
                "data": None if image.key else image.data,
                "store_key": image.key,
                "revised_prompt": image.revised_prompt,
                "created_at": now,
            }
        )
    return rows
