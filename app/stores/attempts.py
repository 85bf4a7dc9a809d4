"""The worker's units of work around an attempt: each is one transaction holding one transition of
the task (app.state.attempts) and the attempt's records that go with it: the calls it makes, how
each ended, the images it stored, and the webhook events announcing the task's end.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import Engine, insert, select, update

from imagegate.app.edits import InputFile
from imagegate.app.failures import Failure
from imagegate.app.models import Attempt, Image, Task, utcnow
from imagegate.app.state import attempts as transitions
from imagegate.app.state.refused import Outcome, Refused
from imagegate.app.stores.inputs import load_inputs
from imagegate.app.stores.successes import image_rows, write_successes
from imagegate.app.stores.webhooks import enqueue_task_events

tasks, attempts, images = Task.__table__, Attempt.__table__, Image.__table__


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
    created_at: datetime | None = None  # the task's intake, for the time-to-start and time-to-end metrics
    api_key_id: uuid.UUID | None = None  # for the run's log lines
    # The fan-out slots whose calls this attempt makes (recorded in `attempts` with the claim).
    slots: tuple[int, ...] = ()
    # A synchronous request waits for this attempt: its reply is handed over (app/wakeups.py).
    awaited: bool = False


@dataclass(frozen=True)
class NewImage:
    data: bytes
    content_type: str
    revised_prompt: str | None = None
    slot: int = 0
    id: uuid.UUID = field(default_factory=uuid.uuid4)
    # Where the bytes were put in the image store before the row is written; None: in the row itself.
    key: str | None = None


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


@dataclass(frozen=True)
class Wait:
    """An attempt its model's upstream limits have no room for yet: why, and when to ask again."""

    reason: str  # app.state.tasks.QueuedReason
    countdown_s: float


@dataclass(frozen=True)
class Waiting:
    """The claim was not made: the task stays pending, waiting `countdown_s` (see `claim`)."""

    task_id: uuid.UUID
    attempt: int
    reason: str
    countdown_s: float
    batch_id: uuid.UUID | None = None


# Given the claim and its planned slots, None to make the calls now, or how long to wait. Asked
# before the claim is written (inside the claim's transaction; for a group, between its read and its
# claim), so a wait leaves no trace of the claim. An admit may also answer for a claim group at once
# (see `AdmitsTogether`).
AdmitCalls = Callable[[Claim, list[int]], Wait | None]


class AdmitsTogether(Protocol):
    """An `AdmitCalls` whose `together` answers for several claims in one go, in order (a wait,
    None, or the exception that ask alone raised): a claim group asks Redis once, not per claim.
    The asks of one group are answered together when their admits share one `together`."""

    def __call__(self, claim: Claim, slots: list[int]) -> Wait | None: ...

    def together(self, asked: list[tuple[Any, Claim, list[int]]]) -> list[Wait | Exception | None]: ...


@dataclass(frozen=True)
class ClaimAsk:
    """One claim of a group (see app/stores/claim_groups.py): the arguments of `AttemptStore.claim`."""

    task_id: uuid.UUID
    attempt: int
    worker: str
    lease_s: float
    plan: PlanCalls
    admit: AdmitCalls | None = None


class _NotAdmitted(Exception):
    def __init__(self, claim: Claim, wait: Wait) -> None:
        self.claim, self.wait = claim, wait


def attempt_rows(claim: Claim, slots: Iterable[int], worker: str, now: datetime) -> list[dict[str, Any]]:
    """The `attempts` rows of a claim's calls, one per fan-out slot, written with the claim."""
    return [
        {
            "task_id": claim.task_id,
            "number": claim.attempt,
            "slot": slot,
            "model": claim.route,
            "worker": worker,
            "started_at": now,
        }
        for slot in slots
    ]


def _after(seconds: float) -> datetime:
    return utcnow() + timedelta(seconds=seconds)


@dataclass
class AttemptStore:
    engine: Engine
    # Rows per statement when renewing many leases at once.
    lease_chunk: int = field(default=500)
    # Each statement committed on its own (one round trip, no BEGIN and COMMIT).
    autocommit: Engine = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")

    def claim(
        self,
        task_id: uuid.UUID,
        attempt: int,
        *,
        worker: str,
        lease_s: float,
        plan: PlanCalls,
        admit: AdmitCalls | None = None,
    ) -> Claim | Waiting | Refused:
        """pending -> running for attempt `attempt`, the calls about to be made recorded in the same
        transaction; refused when another delivery got there first, or the attempt is past. When
        `admit` says the calls must wait, the claim is rolled back and the task stays pending,
        waiting (`wait_for_model`): no attempt is used."""
        try:
            return self._claim(task_id, attempt, worker=worker, lease_s=lease_s, plan=plan, admit=admit)
        except _NotAdmitted as not_admitted:
            claim, wait = not_admitted.claim, not_admitted.wait
        with self.engine.begin() as connection:
            written = transitions.wait_for_model(
                connection, task_id, attempt, now=utcnow(), reason=wait.reason, countdown_s=wait.countdown_s
            )
        if not written:
            return written
        return Waiting(task_id, attempt, wait.reason, wait.countdown_s, claim.batch_id)

    def _claim(
        self,
        task_id: uuid.UUID,
        attempt: int,
        *,
        worker: str,
        lease_s: float,
        plan: PlanCalls,
        admit: AdmitCalls | None,
    ) -> Claim | Refused:
        with self.engine.begin() as connection:
            row = transitions.claim(
                connection, task_id, attempt, worker=worker, now=utcnow(), lease_until=_after(lease_s)
            )
            if not row:
                return row
            claim = Claim(*row)
            done = (
                set(connection.scalars(select(images.c.slot).where(images.c.task_id == task_id).distinct()))
                if attempt > 1
                else set()
            )
            slots = plan(claim, done)
            if slots and admit is not None and (wait := admit(claim, slots)) is not None:
                raise _NotAdmitted(claim, wait)  # rolls the claim back
            if slots:
                connection.execute(insert(attempts), attempt_rows(claim, slots, worker, utcnow()))
        return Claim(**{**claim.__dict__, "slots": tuple(slots)})

    def inputs(self, task_id: uuid.UUID) -> tuple[list[InputFile], InputFile | None]:
        """An edit task's input files: (the images in order, the mask or None)."""
        return load_inputs(self.engine, task_id)

    def claim_poll(self, task_id: uuid.UUID, attempt: int, poll: int, *, lease_s: float) -> Claim | Refused:
        """Take poll step `poll` of a running attempt that is waiting on an asynchronous upstream."""
        with self.engine.begin() as connection:
            row = transitions.claim_poll(connection, task_id, attempt, poll, lease_until=_after(lease_s))
        return Claim(*row) if row else row

    def extend_leases(self, held: Iterable[tuple[uuid.UUID, int]], lease_s: float) -> int:
        """Renew the leases of every (task, attempt) this process still runs, in one statement per chunk.
        Returns how many were still ours."""
        held = list(held)
        with self.engine.begin() as connection:
            return sum(
                transitions.extend_leases(connection, held[start : start + self.lease_chunk], _after(lease_s))
                for start in range(0, len(held), self.lease_chunk)
            )

    def wait_upstream(self, claim: Claim, upstream_task_id: str, *, lease_s: float) -> Outcome:
        """Keep the attempt while the asynchronous upstream works: the lease covers the next poll."""
        with self.engine.begin() as connection:
            return transitions.wait_upstream(
                connection, claim.task_id, claim.attempt, upstream_task_id=upstream_task_id, lease_until=_after(lease_s)
            )

    def succeed_many(self, ends: list[Success]) -> list[Outcome]:
        """Several attempts' successes in one transaction: under load a worker's ends arrive faster
        than one commit each would keep up with. Each keeps its own fence; True where it was written.
        On Postgres the group is one statement (app/stores/successes.py), so it is autocommitted
        unless webhook events must commit with it."""
        now = utcnow()
        held = [(end.claim.task_id, end.claim.attempt) for end in ends]
        announcing = any(end.claim.callback_url for end in ends)
        one_statement = self.engine.dialect.name == "postgresql"
        with self.autocommit.connect() if one_statement and not announcing else self.engine.begin() as connection:
            by_attempt = write_successes(connection, ends, now)
            announced = [
                end.claim.task_id
                for end, pair in zip(ends, held, strict=True)
                if by_attempt[pair] is True and end.claim.callback_url
            ]
            if announced:  # the webhook events commit with the ends they announce
                enqueue_task_events(connection, announced)
        return [by_attempt[pair] for pair in held]

    def images_written(self, image_ids: list[uuid.UUID]) -> set[uuid.UUID]:
        """Which of these images have their row: after a refused write, the bytes of the others can go."""
        with self.engine.connect() as connection:
            return set(connection.scalars(select(images.c.id).where(images.c.id.in_(image_ids))))

    def fail(self, claim: Claim, failure: Failure, outcomes: list[CallOutcome]) -> Outcome:
        return self._end(claim, transitions.fail, [], outcomes, ended=True, failure=failure)

    def end_cancelled(self, claim: Claim) -> Outcome:
        """running -> failed `cancelled`, when the client asked while this attempt ran."""
        return self._end(claim, transitions.end_cancelled, [], [], ended=True)

    def retry_later(
        self,
        claim: Claim,
        failure: Failure,
        outcomes: list[CallOutcome],
        *,
        countdown_s: float,
        images_: list[NewImage] = (),
        usage: dict[str, Any] | None = None,
        route: str | None = None,
    ) -> Outcome:
        """running -> pending, keeping the attempt count and the images of the calls that worked.
        With `route`, the next attempt goes to that fallback model with fresh retries."""
        return self._end(
            claim,
            transitions.retry_later,
            images_,
            outcomes,
            ended=False,
            failure=failure,
            countdown_s=countdown_s,
            retries_used=0 if route else claim.retries_used + 1,
            usage=usage,
            route=route,
        )

    def _end(
        self,
        claim: Claim,
        transition: Callable[..., Outcome],
        new_images: list[NewImage] | tuple,
        outcomes: list[CallOutcome],
        *,
        ended: bool,
        **arguments: Any,
    ) -> Outcome:
        now = utcnow()
        with self.engine.begin() as connection:
            written = transition(connection, claim.task_id, claim.attempt, now=now, **arguments)
            if not written:
                return written
            for outcome in outcomes:
                failure = outcome.failure
                connection.execute(
                    update(attempts)
                    .where(
                        attempts.c.task_id == claim.task_id,
                        attempts.c.number == claim.attempt,
                        attempts.c.slot == outcome.slot,
                    )
                    .values(
                        ended_at=now,
                        upstream_status=failure.upstream_status if failure else outcome.upstream_status,
                        error_code=failure.code if failure else None,
                        error_message=failure.message if failure else None,
                    )
                )
            if new_images:
                connection.execute(insert(images), image_rows(claim, new_images, now))
            if ended and claim.callback_url:  # the webhook event commits with the end it announces
                enqueue_task_events(connection, [claim.task_id])
        return True
