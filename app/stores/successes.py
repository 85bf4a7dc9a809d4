"""A group of successes' transitions on Postgres as one statement: the tasks' guarded running ->
succeed, their usage and the end of their calls, the calls ended only for an attempt whose
transition was written (a data-modifying CTE joined on the transition's RETURNING). Three
statements were a third of a lone success's CPU in the worker.

The image rows are not in it: passed as a bytea[] array, a 150 KB image made the write three
times dearer for the worker and for Postgres (measured), more than the statements it saved."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Integer, Text, Uuid, cast, func, select, update

from imagegate.app.models import Attempt, Task
from imagegate.app.state import attempts as transitions
from imagegate.app.state.refused import Outcome

tasks, attempts = Task.__table__, Attempt.__table__


def _statement():
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
    return select(done.c.id, done.c.attempts).add_cte(ended)


_SUCCEED_WITH_CALLS = _statement()


def succeed_with_calls(connection: Connection, ends: Sequence, now: datetime) -> dict[tuple[uuid.UUID, int], Outcome]:
    """For each of these successes (`Success` of app/stores/attempts.py), True where written, else
    why not."""
    rows = connection.execute(_SUCCEED_WITH_CALLS, _parameters(ends, now))
    done = {(row.id, row.attempts) for row in rows}
    refused = [(end.claim.task_id, end.claim.attempt) for end in ends]
    refused = [pair for pair in refused if pair not in done]
    return dict.fromkeys(done, True) | (transitions.why_refused_each(connection, refused) if refused else {})


def _parameters(ends: Sequence, now: datetime) -> dict[str, Any]:
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
    }
