"""The worker's task transitions: claim an attempt, renew leases, end it. Each is one guarded UPDATE
in one transaction, written as Core statements on the tables: at a thousand calls in flight the ORM's
per-statement bookkeeping was most of the worker's CPU.

The guard `status = 'pending' AND attempts = attempt - 1` on a claim is what makes a duplicate
Celery delivery a no-op: only one delivery of attempt N can move the task to running, and every
later write is fenced on `status = 'running' AND attempts = N` (see `_fence`), so a worker that
was presumed dead and lost its attempt to another cannot overwrite anything.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (Connection, ColumnElement, Engine, Integer, Uuid, bindparam, column, insert,
                        select, tuple_, update, values)

from app.models import Attempt, Image, Task, utcnow
from app.states import TaskStatus
from app.store import CANCELLED, Failure, error_values
from app.webhook_events import enqueue_task_events

tasks, attempts, images = Task.__table__, Attempt.__table__, Image.__table__

CLAIM_COLUMNS = (tasks.c.id, tasks.c.attempts, tasks.c.model, tasks.c.route, tasks.c.retries_used, tasks.c.request,
                 tasks.c.usage, tasks.c.upstream_task_id, tasks.c.started_at, tasks.c.polls, tasks.c.batch_id,
                 tasks.c.callback_url)


@dataclass(frozen=True)
class Claim:
    """What a worker needs to make attempt `attempt` of a task it now owns."""

    task_id: uuid.UUID
    attempt: int
    model: str
    route: str
    retries_used: int
    request: dict[str, Any]
    usage: dict[str, Any] | None
    upstream_task_id: str | None
    started_at: datetime
    polls: int
    batch_id: uuid.UUID | None = None
    callback_url: str | None = None
    # The fan-out slots whose calls this attempt makes (recorded in `attempts` with the claim).
    slots: tuple[int, ...] = ()


@dataclass(frozen=True)
class NewImage:
    data: bytes
    content_type: str
    revised_prompt: str | None = None
    slot: int = 0


@dataclass(frozen=True)
class CallOutcome:
    """How one upstream call of an attempt ended (failure None: it gave its images)."""

    slot: int
    upstream_status: int | None = None
    failure: Failure | None = None


@dataclass(frozen=True)
class Success:
    """An attempt whose every call gave its images: what `succeed_many` writes."""

    claim: Claim
    images: list[NewImage]
    usage: dict[str, Any] | None
    outcomes: list[CallOutcome]


# Given the claim and the slots earlier attempts already stored, the slots this attempt calls.
PlanCalls = Callable[[Claim, set[int]], list[int]]


def _after(seconds: float) -> datetime:
    return utcnow() + timedelta(seconds=seconds)


def _fence(claim: Claim) -> list[ColumnElement[bool]]:
    return [tasks.c.id == claim.task_id, tasks.c.status == TaskStatus.RUNNING, tasks.c.attempts == claim.attempt]


@dataclass
class AttemptStore:
    engine: Engine
    # Rows per statement when renewing many leases at once.
    lease_chunk: int = field(default=500)

    def claim(self, task_id: uuid.UUID, attempt: int, *, worker: str, lease_s: float,
              plan: PlanCalls) -> Claim | None:
        """pending -> running for attempt `attempt`, the calls about to be made recorded in the same
        transaction; None when another delivery got there first."""
        guard = [tasks.c.status == TaskStatus.PENDING, tasks.c.attempts == attempt - 1]
        with self.engine.begin() as connection:
            claim = self._claim_where(connection, task_id, guard, status=TaskStatus.RUNNING, attempts=attempt,
                                      worker=worker, started_at=utcnow(), lease_expires_at=_after(lease_s), polls=0)
            if claim is None:
                return None
            done = set(connection.scalars(select(images.c.slot).where(images.c.task_id == task_id).distinct())) \
                if attempt > 1 else set()
            slots = plan(claim, done)
            if slots:
                now = utcnow()
                connection.execute(insert(attempts), [
                    {"task_id": task_id, "number": attempt, "slot": slot, "model": claim.route, "worker": worker,
                     "started_at": now} for slot in slots])
        return Claim(**{**claim.__dict__, "slots": tuple(slots)})

    def claim_poll(self, task_id: uuid.UUID, attempt: int, poll: int, *, lease_s: float) -> Claim | None:
        """Take poll step `poll` of a running attempt that is waiting on an asynchronous upstream."""
        guard = [tasks.c.status == TaskStatus.RUNNING, tasks.c.attempts == attempt, tasks.c.polls == poll - 1,
                 tasks.c.upstream_task_id.is_not(None)]
        with self.engine.begin() as connection:
            return self._claim_where(connection, task_id, guard, polls=poll, lease_expires_at=_after(lease_s))

    @staticmethod
    def _claim_where(connection: Connection, task_id: uuid.UUID, guard: list[ColumnElement[bool]],
                     **values: Any) -> Claim | None:
        row = connection.execute(update(tasks).where(tasks.c.id == task_id, *guard).values(**values)
                                 .returning(*CLAIM_COLUMNS)).one_or_none()
        return Claim(*row) if row is not None else None

    def extend_leases(self, held: Iterable[tuple[uuid.UUID, int]], lease_s: float) -> int:
        """Renew the leases of every (task, attempt) this process still runs, in one statement per chunk.
        Returns how many were still ours."""
        held = list(held)
        renewed = 0
        with self.engine.begin() as connection:
            for start in range(0, len(held), self.lease_chunk):
                chunk = held[start:start + self.lease_chunk]
                renewed += connection.execute(
                    update(tasks).where(tasks.c.status == TaskStatus.RUNNING,
                                        tuple_(tasks.c.id, tasks.c.attempts).in_(chunk))
                    .values(lease_expires_at=_after(lease_s))).rowcount
        return renewed

    def wait_upstream(self, claim: Claim, upstream_task_id: str, *, lease_s: float) -> bool:
        """Keep the attempt while the asynchronous upstream works: the lease covers the next poll."""
        with self.engine.begin() as connection:
            return _owned(connection, claim, go_on=True, upstream_task_id=upstream_task_id,
                          lease_expires_at=_after(lease_s))

    def succeed(self, claim: Claim, images_: list[NewImage], usage: dict[str, Any] | None,
                outcomes: list[CallOutcome]) -> bool:
        return self._end(claim, TaskStatus.SUCCEED, images_, outcomes, usage=usage)

    def succeed_many(self, ends: list[Success]) -> list[bool]:
        """Several attempts' successes in one transaction: under load a worker's ends arrive faster
        than one commit each would keep up with. Each keeps its own fence; True where it was written."""
        now = utcnow()
        with self.engine.begin() as connection:
            ended = _end_succeeded(connection, [end.claim for end in ends], now)
            written = [(end.claim.task_id, end.claim.attempt) in ended for end in ends]
            mine = [end for end, ok in zip(ends, written) if ok]
            usages = [{"tid": end.claim.task_id, "usage_": end.usage} for end in mine if end.usage is not None]
            if usages:
                connection.execute(update(tasks).where(tasks.c.id == bindparam("tid"))
                                   .values(usage=bindparam("usage_", type_=tasks.c.usage.type)), usages)
            outcomes = [{"tid": end.claim.task_id, "attempt_": end.claim.attempt, "slot_": outcome.slot,
                         "upstream_status": outcome.upstream_status}
                        for end in mine for outcome in end.outcomes]
            if outcomes:
                connection.execute(
                    update(attempts).where(attempts.c.task_id == bindparam("tid"), attempts.c.number == bindparam("attempt_"),
                                           attempts.c.slot == bindparam("slot_"))
                    .values(ended_at=now, error_code=None, error_message=None), outcomes)
            rows = [row for end in mine for row in _image_rows(end.claim, end.images, now)]
            if rows:
                connection.execute(insert(images), rows)
            announced = [end.claim.task_id for end in mine if end.claim.callback_url]
            if announced:  # the webhook events commit with the ends they announce
                enqueue_task_events(connection, announced)
        return written

    def fail(self, claim: Claim, failure: Failure, outcomes: list[CallOutcome]) -> bool:
        return self._end(claim, TaskStatus.FAILED, [], outcomes, **error_values(failure))

    def end_cancelled(self, claim: Claim) -> bool:
        """running -> failed `cancelled`, when the client asked while this attempt ran."""
        with self.engine.begin() as connection:
            ended = _update(connection, [*_fence(claim), tasks.c.cancel_requested.is_(True)],
                            status=TaskStatus.FAILED, worker=None, lease_expires_at=None, finished_at=utcnow(),
                            **error_values(CANCELLED))
            if ended and claim.callback_url:
                enqueue_task_events(connection, [claim.task_id])
            return ended

    def retry_later(self, claim: Claim, failure: Failure, outcomes: list[CallOutcome], *, countdown_s: float,
                    images_: list[NewImage] = (), usage: dict[str, Any] | None = None,
                    route: str | None = None) -> bool:
        """running -> pending, keeping the attempt count and the images of the calls that worked.
        With `route`, the next attempt goes to that fallback model with fresh retries."""
        values = error_values(failure) | {"usage": usage, "upstream_task_id": None, "run_after": _after(countdown_s),
                                           "retries_used": 0 if route else claim.retries_used + 1}
        if route is not None:
            values["route"] = route
        return self._end(claim, TaskStatus.PENDING, images_, outcomes, **values)

    def _end(self, claim: Claim, status: TaskStatus, new_images: list[NewImage] | tuple,
             outcomes: list[CallOutcome], **values: Any) -> bool:
        now = utcnow()
        if status.finished:
            values["finished_at"] = now
        with self.engine.begin() as connection:
            # A failure may always be written; images and retries only while not cancelled.
            if not _owned(connection, claim, go_on=status != TaskStatus.FAILED, status=status, worker=None,
                          lease_expires_at=None, **values):
                return False
            for outcome in outcomes:
                failure = outcome.failure
                connection.execute(
                    update(attempts)
                    .where(attempts.c.task_id == claim.task_id, attempts.c.number == claim.attempt,
                           attempts.c.slot == outcome.slot)
                    .values(ended_at=now,
                            upstream_status=failure.upstream_status if failure else outcome.upstream_status,
                            error_code=failure.code if failure else None,
                            error_message=failure.message if failure else None))
            if new_images:
                connection.execute(insert(images), _image_rows(claim, new_images, now))
            if status.finished and claim.callback_url:  # the webhook event commits with the end it announces
                enqueue_task_events(connection, [claim.task_id])
        return True


def _end_succeeded(connection: Connection, claims: list[Claim], now: datetime) -> set[tuple[uuid.UUID, int]]:
    """running -> succeed for each claim still owned and not cancelled; the (task, attempt) pairs written.
    On Postgres one statement for all (a round trip per task made one writer the bottleneck)."""
    guard = [tasks.c.status == TaskStatus.RUNNING, tasks.c.cancel_requested.is_(False)]
    succeed = {"status": TaskStatus.SUCCEED, "worker": None, "lease_expires_at": None, "finished_at": now}
    if connection.dialect.name == "postgresql":
        held = values(column("id", Uuid), column("attempt", Integer), name="held").data(
            [(claim.task_id, claim.attempt) for claim in claims])
        rows = connection.execute(update(tasks).where(tasks.c.id == held.c.id, tasks.c.attempts == held.c.attempt, *guard)
                                  .values(**succeed).returning(tasks.c.id, tasks.c.attempts))
        return {(row.id, row.attempts) for row in rows}
    return {(claim.task_id, claim.attempt) for claim in claims
            if _update(connection, [*_fence(claim), *guard[1:]], **succeed)}


def _image_rows(claim: Claim, new_images: list[NewImage] | tuple, now: datetime) -> list[dict[str, Any]]:
    indexes: dict[int, int] = {}
    rows = []
    for image in new_images:
        index = indexes[image.slot] = indexes.get(image.slot, -1) + 1
        rows.append({"id": uuid.uuid4(), "task_id": claim.task_id, "slot": image.slot, "index": index,
                     "content_type": image.content_type, "data": image.data, "revised_prompt": image.revised_prompt,
                     "created_at": now})
    return rows


def _owned(connection: Connection, claim: Claim, *, go_on: bool = False, **values: Any) -> bool:
    """The fence: change the task only while attempt `claim.attempt` is still running (and, with
    go_on, not cancelled)."""
    guard = _fence(claim) + ([tasks.c.cancel_requested.is_(False)] if go_on else [])
    return _update(connection, guard, **values)


def _update(connection: Connection, guard: list[ColumnElement[bool]], **values: Any) -> bool:
    return connection.execute(update(tasks).where(*guard).values(**values)).rowcount > 0
