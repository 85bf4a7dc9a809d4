"""The webhook event machine (an outbox row, delivered at least once):

    (an end announced) -> pending -> sending -> delivered | failed | disabled (410 Gone)
                          pending <- sending                (a retry, or a lost sender's lease taken back)
                          pending <- delivered | failed | disabled   (an explicit redelivery)

While sending, `next_attempt_at` is the sender's lease; every write of an attempt is fenced on
`attempts`, so a sender whose lease was taken back cannot record over the next one.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, Connection, Row, insert, or_, select, update

from imagegate.app.models import WebhookEvent
from imagegate.app.state.guards import status_is
from imagegate.app.state.refused import Outcome, Refused


class EventStatus(StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    DELIVERED = "delivered"
    FAILED = "failed"
    DISABLED = "disabled"  # the callback URL answered 410 Gone


ENDED = (EventStatus.DELIVERED, EventStatus.FAILED, EventStatus.DISABLED)

events = WebhookEvent.__table__
CLAIM_COLUMNS = (
    events.c.id,
    events.c.api_key_id,
    events.c.type,
    events.c.task_id,
    events.c.batch_id,
    events.c.url,
    events.c.attempts,
)


def new_event(
    *,
    api_key_id: uuid.UUID,
    type: str,
    url: str,
    now: datetime,
    task_id: uuid.UUID | None = None,
    batch_id: uuid.UUID | None = None,
) -> dict[str, Any]:
    """The row of an event about to be announced, for `enqueue`. Its id is every delivery's webhook-id."""
    return {
        "id": f"msg_{uuid.uuid4().hex}",
        "api_key_id": api_key_id,
        "type": type,
        "task_id": task_id,
        "batch_id": batch_id,
        "url": url,
        "status": EventStatus.PENDING,
        "attempts": 0,
        "next_attempt_at": now,
        "created_at": now,
    }


def enqueue(connection: Connection, rows: list[dict[str, Any]]) -> None:
    """(none) -> pending, in the transaction of the end the events announce."""
    connection.execute(insert(events), rows)


def claim(connection: Connection, event_id: str, *, now: datetime, lease_s: float) -> Row | Refused:
    """pending -> sending, one attempt more, leased for `lease_s`; the claim's columns (CLAIM_COLUMNS)."""
    row = connection.execute(
        update(events)
        .where(events.c.id == event_id, status_is(events.c.status, EventStatus.PENDING))
        .values(
            status=EventStatus.SENDING, attempts=events.c.attempts + 1, next_attempt_at=now + timedelta(seconds=lease_s)
        )
        .returning(*CLAIM_COLUMNS)
    ).one_or_none()
    if row is not None:
        return row
    status = connection.scalar(select(events.c.status).where(events.c.id == event_id))
    if status is None:
        return Refused.NOT_FOUND
    return Refused.ALREADY_CLAIMED if status == EventStatus.SENDING else Refused.ALREADY_ENDED


def _sent(connection: Connection, event_id: str, attempt: int, **values: Any) -> Outcome:
    """The guard of ending attempt `attempt`: the event is still sending it (its lease was not taken back)."""
    if connection.execute(
        update(events)
        .where(events.c.id == event_id, status_is(events.c.status, EventStatus.SENDING), events.c.attempts == attempt)
        .values(**values)
    ).rowcount:
        return True
    row = connection.execute(select(events.c.status, events.c.attempts).where(events.c.id == event_id)).one_or_none()
    if row is None:
        return Refused.NOT_FOUND
    return Refused.ALREADY_ENDED if row.status in ENDED else Refused.STALE_ATTEMPT


def finish(connection: Connection, event_id: str, attempt: int, status: EventStatus) -> Outcome:
    """sending -> delivered | failed | disabled."""
    if status not in ENDED:
        raise ValueError(f"a webhook event cannot end {status!r}")
    return _sent(connection, event_id, attempt, status=status)


def retry(connection: Connection, event_id: str, attempt: int, *, at: datetime) -> Outcome:
    """sending -> pending, due at `at`."""
    return _sent(connection, event_id, attempt, status=EventStatus.PENDING, next_attempt_at=at)


def redeliver(connection: Connection, event_id: str, *, now: datetime) -> Outcome:
    """delivered | failed | disabled | pending -> pending, due now; refused while an attempt is sending
    (that attempt ends it, or its lease is taken back)."""
    if connection.execute(
        update(events)
        .where(events.c.id == event_id, events.c.status != EventStatus.SENDING)
        .values(status=EventStatus.PENDING, next_attempt_at=now)
    ).rowcount:
        return True
    found = connection.scalar(select(events.c.id).where(events.c.id == event_id))
    return Refused.ALREADY_CLAIMED if found else Refused.NOT_FOUND


def is_overdue(now: datetime, republish_after_s: float) -> ColumnElement[bool]:
    """Pending and due long ago (its message lost, or a full delivery lane left it in the outbox), or
    sending past its lease (its sender died mid-attempt)."""
    return or_(
        (events.c.status == EventStatus.PENDING)
        & (events.c.next_attempt_at < now - timedelta(seconds=republish_after_s)),
        (events.c.status == EventStatus.SENDING) & (events.c.next_attempt_at < now),
    )


def take_back_overdue(
    connection: Connection, now: datetime, republish_after_s: float, limit: int | None = None
) -> list[str]:
    """pending | sending -> pending, due now: the `limit` oldest overdue events, to send again."""
    overdue = is_overdue(now, republish_after_s)
    oldest = select(events.c.id).where(overdue).order_by(events.c.next_attempt_at).limit(limit)
    return list(
        connection.scalars(
            update(events)
            .where(events.c.id.in_(oldest.scalar_subquery()), overdue)
            .values(status=EventStatus.PENDING, next_attempt_at=now)
            .returning(events.c.id)
        )
    )
