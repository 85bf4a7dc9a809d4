"""The task machine as the worker drives it: claim an attempt, renew its lease, end it. Each is one
guarded UPDATE written as a Core statement: at a thousand calls in flight the ORM's per-statement
bookkeeping was most of the worker's CPU.

The guard `status = 'pending' AND attempts = attempt - 1` on a claim is what makes a duplicate
Celery delivery a no-op: only one delivery of attempt N can move the task to running, and every
later write is fenced on `status = 'running' AND attempts = N` (see `_fence`), so a worker that
was presumed dead and lost its attempt to another cannot overwrite anything.

A refused transition reads the task once more to say why (`why_refused`): only on that path, so
the written path costs what it did. Every guard here is monotonic (attempts only grow, an ended
task stays ended, cancel_requested is never cleared), so that later read agrees with the refusal.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Integer,
    Row,
    Uuid,
    bindparam,
    column,
    func,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql.dml import Update

from imagegate.app.failures import CANCELLED, Failure
from imagegate.app.models import Task
from imagegate.app.state.guards import status_is
from imagegate.app.state.refused import Outcome, Refused
from imagegate.app.state.tasks import ENDED, TaskStatus

tasks = Task.__table__

CLAIM_COLUMNS = (
    tasks.c.id,
    tasks.c.attempts,
    tasks.c.model,
    tasks.c.route,
    tasks.c.retries_used,
    tasks.c.request,
    tasks.c.usage,
    tasks.c.upstream_task_id,
    tasks.c.started_at,
    tasks.c.polls,
    tasks.c.batch_id,
    tasks.c.callback_url,
    tasks.c.created_at,
    tasks.c.api_key_id,
)


_STATE = select(tasks.c.id, tasks.c.status, tasks.c.attempts, tasks.c.polls, tasks.c.cancel_requested)
_STATE_OF_ONE = _STATE.where(tasks.c.id == bindparam("id"))


def arrays_as_rows(name: str, *, ordinality: str | None = None, **columns: Any):
    """A FROM named `name` on Postgres: unnest() of one bound array per column, the arrays bound as
    `<name>_<column>` (with `ordinality`, a column of that name numbers the rows from 1). The
    statement is the same for any number of rows, so SQLAlchemy compiles it once and psycopg
    prepares it once (a VALUES list cannot be cached by SQLAlchemy: it was compiled anew for every
    group). Not for image bytes: see app/stores/successes.py."""
    arrays = [bindparam(f"{name}_{column_name}", type_=ARRAY(type_)) for column_name, type_ in columns.items()]
    return (
        func.unnest(*arrays)
        .table_valued(
            *(column(column_name, type_) for column_name, type_ in columns.items()), with_ordinality=ordinality
        )
        .render_derived(name)
    )


def _fence(task_id: uuid.UUID, attempt: int, *, go_on: bool = False) -> list[ColumnElement[bool]]:
    """Attempt `attempt` is still the task's running one (and, with go_on, not cancelled)."""
    guard = [tasks.c.id == task_id, status_is(tasks.c.status, TaskStatus.RUNNING), tasks.c.attempts == attempt]
    return guard + [tasks.c.cancel_requested.is_(False)] if go_on else guard


def _written(
    connection: Connection, guard: list[ColumnElement[bool]], task_id: uuid.UUID, attempt: int, **values_: Any
) -> Outcome:
    if connection.execute(update(tasks).where(*guard).values(**values_)).rowcount > 0:
        return True
    return why_refused(connection, task_id, attempt)


# -- claiming ----------------------------------------------------------------------------------
def claim(
    connection: Connection, task_id: uuid.UUID, attempt: int, *, worker: str, now: datetime, lease_until: datetime
) -> Row | Refused:
    """pending -> running for attempt `attempt`; the claim's columns (CLAIM_COLUMNS)."""
    row = connection.execute(
        update(tasks)
        .where(tasks.c.id == task_id, status_is(tasks.c.status, TaskStatus.PENDING), tasks.c.attempts == attempt - 1)
        .values(
            status=TaskStatus.RUNNING,
            attempts=attempt,
            worker=worker,
            started_at=now,
            lease_expires_at=lease_until,
            polls=0,
            queued_reason=None,
        )
        .returning(*CLAIM_COLUMNS)
    ).one_or_none()
    return row if row is not None else why_refused(connection, task_id, attempt, claiming=True)


def claimable_each(connection: Connection, asks: Sequence[tuple[uuid.UUID, int]]) -> dict[uuid.UUID, Row]:
    """The rows of the (task, attempt) pairs whose attempt may be claimed now (pending, attempt - 1
    made), by task id, on Postgres: the first half of a group's claim (`claim_from`), so the
    claims' calls can be admitted between the two (see app/stores/claim_groups.py). Not locked:
    the claim is guarded, and refused for a row that changed meanwhile."""
    rows = connection.execute(
        _CLAIMABLE,
        {"asked_id": [task_id for task_id, _ in asks], "asked_attempt": [attempt for _, attempt in asks]},
    )
    return {row.id: row for row in rows}


_ASKED = arrays_as_rows("asked", id=Uuid, attempt=Integer)
_CLAIMABLE = select(*CLAIM_COLUMNS).where(
    tasks.c.id == _ASKED.c.id, tasks.c.attempts == _ASKED.c.attempt - 1, status_is(tasks.c.status, TaskStatus.PENDING)
)
_RUNNING = {"status": TaskStatus.RUNNING, "polls": 0, "queued_reason": None}


def claim_from(pairs) -> Update:
    """pending -> running for the (task, attempt) pairs of `pairs` (a FROM with columns id and
    attempt) whose attempt comes next, by the bound `worker` until the bound `lease_until`, started
    at the bound `started_at`; returning the claimed ids and attempts."""
    return (
        update(tasks)
        .where(
            tasks.c.id == pairs.c.id,
            status_is(tasks.c.status, TaskStatus.PENDING),
            tasks.c.attempts == pairs.c.attempt - 1,
        )
        .values(
            attempts=pairs.c.attempt,
            worker=bindparam("worker", type_=tasks.c.worker.type),
            started_at=bindparam("started_at", type_=tasks.c.started_at.type),
            lease_expires_at=bindparam("lease_until", type_=tasks.c.lease_expires_at.type),
            **_RUNNING,
        )
        .returning(tasks.c.id, tasks.c.attempts)
    )


def claim_refused(row: Row | None, attempt: int) -> Refused:
    """Why a claim of attempt `attempt` was refused, given the task's state row (see `states_of`)."""
    return _reason(row, attempt, claiming=True)


def states_of(connection: Connection, task_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Row]:
    return {row.id: row for row in connection.execute(_STATE.where(tasks.c.id.in_(list(task_ids))))}


def wait_for_model(
    connection: Connection, task_id: uuid.UUID, attempt: int, *, now: datetime, reason: str, countdown_s: float
) -> Outcome:
    """pending -> pending, attempt `attempt` left unclaimed: its model's upstream limits had no room
    for its calls, so it is due again in `countdown_s`, saying why. The attempt count and the retries
    stay as they were (no call was made), and run_after moves on so the sweeper does not take the
    wait for a lost message. Refused if another delivery claimed the attempt meanwhile, or it ended."""
    guard = [
        tasks.c.id == task_id,
        status_is(tasks.c.status, TaskStatus.PENDING),
        tasks.c.attempts == attempt - 1,
        tasks.c.cancel_requested.is_(False),
    ]
    values_ = {"queued_reason": reason, "run_after": now + timedelta(seconds=countdown_s)}
    if connection.execute(update(tasks).where(*guard).values(**values_)).rowcount > 0:
        return True
    return why_refused(connection, task_id, attempt, claiming=True)


def claim_poll(
    connection: Connection, task_id: uuid.UUID, attempt: int, poll: int, *, lease_until: datetime
) -> Row | Refused:
    """running -> running: take poll step `poll` of an attempt waiting on an asynchronous upstream."""
    row = connection.execute(
        update(tasks)
        .where(*_fence(task_id, attempt), tasks.c.polls == poll - 1, tasks.c.upstream_task_id.is_not(None))
        .values(polls=poll, lease_expires_at=lease_until)
        .returning(*CLAIM_COLUMNS)
    ).one_or_none()
    return row if row is not None else why_refused(connection, task_id, attempt, poll=poll)


def extend_leases(connection: Connection, held: Sequence[tuple[uuid.UUID, int]], lease_until: datetime) -> int:
    """running -> running, leased longer: every (task, attempt) of `held` still running; how many were."""
    return connection.execute(
        update(tasks)
        .where(status_is(tasks.c.status, TaskStatus.RUNNING), tuple_(tasks.c.id, tasks.c.attempts).in_(held))
        .values(lease_expires_at=lease_until)
    ).rowcount


def wait_upstream(
    connection: Connection, task_id: uuid.UUID, attempt: int, *, upstream_task_id: str, lease_until: datetime
) -> Outcome:
    """running -> running while an asynchronous upstream works: the lease covers the next poll."""
    return _written(
        connection,
        _fence(task_id, attempt, go_on=True),
        task_id,
        attempt,
        upstream_task_id=upstream_task_id,
        lease_expires_at=lease_until,
    )


# -- ending ------------------------------------------------------------------------------------
_RELEASED = {"worker": None, "lease_expires_at": None}


def fail(connection: Connection, task_id: uuid.UUID, attempt: int, *, now: datetime, failure: Failure) -> Outcome:
    """running -> failed. A failure may always be written, cancelled or not."""
    return _written(
        connection,
        _fence(task_id, attempt),
        task_id,
        attempt,
        status=TaskStatus.FAILED,
        finished_at=now,
        **_RELEASED,
        **failure.columns(),
    )


def end_cancelled(connection: Connection, task_id: uuid.UUID, attempt: int, *, now: datetime) -> Outcome:
    """running -> failed `cancelled`, when the client asked while this attempt ran."""
    return _written(
        connection,
        [*_fence(task_id, attempt), tasks.c.cancel_requested.is_(True)],
        task_id,
        attempt,
        status=TaskStatus.FAILED,
        finished_at=now,
        **_RELEASED,
        **CANCELLED.columns(),
    )


def retry_later(
    connection: Connection,
    task_id: uuid.UUID,
    attempt: int,
    *,
    now: datetime,
    failure: Failure,
    countdown_s: float,
    retries_used: int,
    usage: dict[str, Any] | None,
    route: str | None = None,
) -> Outcome:
    """running -> pending for the next attempt, due in `countdown_s`, unless cancelled. With `route`,
    on that fallback model."""
    changes = {"route": route} if route is not None else {}
    return _written(
        connection,
        _fence(task_id, attempt, go_on=True),
        task_id,
        attempt,
        status=TaskStatus.PENDING,
        **_RELEASED,
        **failure.columns(),
        usage=usage,
        upstream_task_id=None,
        run_after=now + timedelta(seconds=countdown_s),
        retries_used=retries_used,
        **changes,
    )


FINISHED_AT = bindparam("finished_at", type_=tasks.c.finished_at.type)


def succeed_from(pairs) -> Update:
    """running -> succeed for the (task, attempt) pairs of `pairs` (a FROM with columns id and attempt)
    still owned and not cancelled, at the bound `finished_at`, returning the written ones' id and
    attempts."""
    return (
        update(tasks)
        .where(
            tasks.c.id == pairs.c.id,
            tasks.c.attempts == pairs.c.attempt,
            status_is(tasks.c.status, TaskStatus.RUNNING),
            tasks.c.cancel_requested.is_(False),
        )
        .values(status=TaskStatus.SUCCEED, finished_at=FINISHED_AT, **_RELEASED)
        .returning(tasks.c.id, tasks.c.attempts)
    )


def succeed_each(
    connection: Connection, held: Sequence[tuple[uuid.UUID, int]], now: datetime
) -> dict[tuple[uuid.UUID, int], Outcome]:
    """running -> succeed for each (task, attempt) still owned and not cancelled, and why not for the
    others: a statement each, the portable form (on Postgres a group is one statement built on
    `succeed_from`: app/stores/successes.py)."""
    succeed = {"status": TaskStatus.SUCCEED, "finished_at": now, **_RELEASED}
    written = {
        (task_id, attempt)
        for task_id, attempt in held
        if connection.execute(update(tasks).where(*_fence(task_id, attempt, go_on=True)).values(**succeed)).rowcount > 0
    }
    refused = [pair for pair in held if pair not in written]
    return {pair: True for pair in written} | (why_refused_each(connection, refused) if refused else {})


# -- why a transition was refused --------------------------------------------------------------
def _reason(row: Row | None, attempt: int, *, claiming: bool = False, poll: int | None = None) -> Refused:
    if row is None:
        return Refused.NOT_FOUND
    if row.status in ENDED:
        return Refused.ALREADY_ENDED
    if row.status != TaskStatus.RUNNING or row.attempts != attempt:
        return Refused.STALE_ATTEMPT
    if claiming:
        return Refused.ALREADY_CLAIMED  # another delivery of this attempt's message took it
    if poll is not None:
        return Refused.ALREADY_CLAIMED if row.polls >= poll else Refused.STALE_ATTEMPT
    return Refused.CANCELLED if row.cancel_requested else Refused.STALE_ATTEMPT


def why_refused(
    connection: Connection, task_id: uuid.UUID, attempt: int, *, claiming: bool = False, poll: int | None = None
) -> Refused:
    """Why a transition of attempt `attempt` was refused (claiming: its claim; poll: that poll step)."""
    row = connection.execute(_STATE_OF_ONE, {"id": task_id}).one_or_none()
    return _reason(row, attempt, claiming=claiming, poll=poll)


def why_refused_each(
    connection: Connection, held: Sequence[tuple[uuid.UUID, int]]
) -> dict[tuple[uuid.UUID, int], Refused]:
    rows = {row.id: row for row in connection.execute(_STATE.where(tasks.c.id.in_([task_id for task_id, _ in held])))}
    return {(task_id, attempt): _reason(rows.get(task_id), attempt) for task_id, attempt in held}
