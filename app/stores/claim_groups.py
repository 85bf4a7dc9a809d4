"""Claims made as a group: what a busy worker does with the tasks it starts at once (see
workers/grouped_claims.py). Each ask gets what its own `AttemptStore.claim` would have given."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta

from sqlalchemy import Integer, Text, Uuid, bindparam, insert, select

from imagegate.app.models import Attempt, Image, utcnow
from imagegate.app.state import attempts as transitions
from imagegate.app.state.refused import Refused
from imagegate.app.stores.attempts import AdmitCalls, AttemptStore, Claim, ClaimAsk, Wait, Waiting, attempt_rows

attempts, images = Attempt.__table__, Image.__table__


def _claim_with_calls():
    """The group's claims (`claim_from`) and the `attempts` rows of their calls in one statement,
    the calls written only for a claimed task; the ids of the tasks claimed."""
    asked = transitions.arrays_as_rows("asked", id=Uuid, attempt=Integer)
    claimed = transitions.claim_from(asked).cte("claimed")
    calls = transitions.arrays_as_rows("calls", task_id=Uuid, slot=Integer, model=Text)
    recorded = (
        insert(attempts)
        .from_select(
            ["task_id", "number", "slot", "model", "worker", "started_at"],
            select(
                calls.c.task_id,
                claimed.c.attempts,
                calls.c.slot,
                calls.c.model,
                bindparam("worker", type_=attempts.c.worker.type),
                bindparam("started_at", type_=attempts.c.started_at.type),
            ).where(calls.c.task_id == claimed.c.id),
        )
        .cte("recorded")
    )
    return select(claimed.c.id).add_cte(recorded)


_CLAIM_WITH_CALLS = _claim_with_calls()


def claim_many(store: AttemptStore, asks: list[ClaimAsk]) -> list[Claim | Waiting | Refused | Exception]:
    """`AttemptStore.claim` for several attempts at once, one result per ask in order (an exception
    an ask's `admit` raised is given back for that ask alone). On Postgres the group's rows are
    read with one SELECT, the calls admitted (together: see `_admit_each`), and the claims written
    with one statement (the UPDATE and the calls' INSERT), each statement committed on its own.
    Nothing is locked between the read and the claim: the claim is guarded as every transition
    is, so an attempt another delivery claimed (or that was cancelled) meanwhile is refused, and
    the room its calls were given is handed back by the caller, as for any refused claim. A
    transaction with a locking read cost two round trips more (BEGIN, COMMIT) and a row lock's
    WAL record per claim."""
    if store.engine.dialect.name != "postgresql":
        return [_claim_or_error(store, ask) for ask in asks]
    results: list[Claim | Waiting | Refused | Exception | None] = [None] * len(asks)
    first: dict[tuple[uuid.UUID, int], int] = {}
    duplicates: list[tuple[int, int]] = []
    for index, ask in enumerate(asks):
        key = (ask.task_id, ask.attempt)
        if key in first:  # another delivery of the same message, in the same group
            duplicates.append((index, first[key]))
        else:
            first[key] = index
    now = utcnow()
    with store.autocommit.connect() as connection:
        rows = transitions.claimable_each(connection, list(first))
        retried = [task_id for (task_id, attempt), _ in first.items() if attempt > 1 and task_id in rows]
        done: dict[uuid.UUID, set[int]] = defaultdict(set)
        if retried:
            for task_id, slot in connection.execute(
                select(images.c.task_id, images.c.slot).where(images.c.task_id.in_(retried)).distinct()
            ):
                done[task_id].add(slot)
        planned: list[tuple[int, Claim, list[int]]] = []
        for (task_id, attempt), index in first.items():
            if (row := rows.get(task_id)) is not None:
                claim = replace(Claim(*row), attempt=attempt, started_at=now, polls=0)
                planned.append((index, claim, asks[index].plan(claim, done[task_id])))
        admitted = _admit_each(asks, planned)
        claimed: dict[tuple[str, float], list[tuple[int, Claim, list[int]]]] = defaultdict(list)
        for (index, claim, slots), answer in zip(planned, admitted, strict=True):
            if isinstance(answer, Exception):
                results[index] = answer
            elif isinstance(answer, Wait):
                written = transitions.wait_for_model(
                    connection,
                    claim.task_id,
                    claim.attempt,
                    now=now,
                    reason=answer.reason,
                    countdown_s=answer.countdown_s,
                )
                results[index] = (
                    Waiting(claim.task_id, claim.attempt, answer.reason, answer.countdown_s, claim.batch_id)
                    if written
                    else written
                )
            else:
                claimed[(asks[index].worker, asks[index].lease_s)].append((index, claim, slots))
        lost: list[tuple[uuid.UUID, int]] = []
        for (worker, lease_s), group in claimed.items():
            # In task id order, so that two groups claiming the same tasks lock their rows in the same order.
            group.sort(key=lambda planned: planned[1].task_id)
            calls = [row for index, claim, slots in group for row in attempt_rows(claim, slots, worker, now)]
            parameters = {
                "asked_id": [claim.task_id for _, claim, _ in group],
                "asked_attempt": [claim.attempt for _, claim, _ in group],
                "calls_task_id": [row["task_id"] for row in calls],
                "calls_slot": [row["slot"] for row in calls],
                "calls_model": [row["model"] for row in calls],
                "worker": worker,
                "started_at": now,
                "lease_until": now + timedelta(seconds=lease_s),
            }
            won = set(connection.scalars(_CLAIM_WITH_CALLS, parameters))
            for index, claim, slots in group:
                if claim.task_id in won:
                    results[index] = replace(claim, slots=tuple(slots))
                else:  # claimed by another delivery, or cancelled, since it was read
                    lost.append((claim.task_id, claim.attempt))
        missing = [key for key in first if key[0] not in rows] + lost
        states = transitions.states_of(connection, [task_id for task_id, _ in missing]) if missing else {}
    for task_id, attempt in missing:
        results[first[(task_id, attempt)]] = transitions.claim_refused(states.get(task_id), attempt)
    for index, original in duplicates:
        answer = results[original]
        results[index] = Refused.ALREADY_CLAIMED if isinstance(answer, (Claim, Waiting)) else answer
    return results  # type: ignore[return-value]


def _admit_each(asks: list[ClaimAsk], planned: list[tuple[int, Claim, list[int]]]) -> list[Wait | Exception | None]:
    """Each planned claim's admission, in order. The asks whose admits share a `together`
    (`AdmitsTogether`) are answered by one call of it: the worker's model gate asks Redis once
    for the group, where a round trip per claim was 7% of a busy worker's CPU."""
    answers: list[Wait | Exception | None] = [None] * len(planned)
    groups: dict[Callable, list[int]] = defaultdict(list)
    for position, (index, _, slots) in enumerate(planned):
        admit = asks[index].admit
        if slots and admit is not None:
            groups[getattr(admit, "together", _one_by_one)].append(position)
    for together, positions in groups.items():
        asked = [
            (asks[planned[position][0]].admit, planned[position][1], planned[position][2]) for position in positions
        ]
        for position, answer in zip(positions, together(asked), strict=True):
            answers[position] = answer
    return answers


def _one_by_one(asked: list[tuple[AdmitCalls, Claim, list[int]]]) -> list[Wait | Exception | None]:
    answers: list[Wait | Exception | None] = []
    for admit, claim, slots in asked:
        try:
            answers.append(admit(claim, slots))
        except Exception as exc:
            answers.append(exc)
    return answers


def _claim_or_error(store: AttemptStore, ask: ClaimAsk) -> Claim | Waiting | Refused | Exception:
    try:
        return store.claim(
            ask.task_id, ask.attempt, worker=ask.worker, lease_s=ask.lease_s, plan=ask.plan, admit=ask.admit
        )
    except Exception as exc:
        return exc
