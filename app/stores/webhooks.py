"""Webhook events: written in the same transaction as the end they announce (an outbox), then
delivered by the workers with retries. An event's id is the webhook-id of every attempt. Their
transitions are in app.state.webhook_events.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, Engine, delete, func, insert, select
from sqlalchemy.orm import Session, sessionmaker

from imagegate.app.idempotency import insert_ignoring_conflict
from imagegate.app.models import (
    ApiKey,
    Batch,
    DisabledCallback,
    Task,
    WebhookDelivery,
    WebhookEvent,
    utcnow,
)
from imagegate.app.state import webhook_events as transitions
from imagegate.app.state.refused import Outcome, Refused
from imagegate.app.state.tasks import ENDED as TASK_ENDED
from imagegate.app.state.webhook_events import EventStatus

BATCH_COMPLETED = "image.batch.completed"


def task_event_type(status: str) -> str:
    return f"image.task.{status}"


def _not_disabled(api_key_column, url_column):
    return (
        ~select(DisabledCallback.url)
        .where(DisabledCallback.api_key_id == api_key_column, DisabledCallback.url == url_column)
        .exists()
    )


def enqueue_task_events(connection: Connection, task_ids: list[uuid.UUID]) -> None:
    """Events for those of these tasks that ended and have a callback URL not disabled for their key."""
    if not task_ids:
        return
    rows = connection.execute(
        select(Task.id, Task.api_key_id, Task.status, Task.callback_url).where(
            Task.id.in_(task_ids),
            Task.callback_url.is_not(None),
            Task.status.in_(TASK_ENDED),
            _not_disabled(Task.api_key_id, Task.callback_url),
        )
    ).all()
    now = utcnow()
    if rows:
        transitions.enqueue(
            connection,
            [
                transitions.new_event(
                    api_key_id=row.api_key_id,
                    type=task_event_type(row.status),
                    task_id=row.id,
                    url=row.callback_url,
                    now=now,
                )
                for row in rows
            ],
        )


def enqueue_batch_event(connection: Connection, batch_id: uuid.UUID) -> None:
    row = connection.execute(
        select(Batch.api_key_id, Batch.callback_url).where(
            Batch.id == batch_id, Batch.callback_url.is_not(None), _not_disabled(Batch.api_key_id, Batch.callback_url)
        )
    ).one_or_none()
    if row is not None:
        transitions.enqueue(
            connection,
            [
                transitions.new_event(
                    api_key_id=row.api_key_id,
                    type=BATCH_COMPLETED,
                    batch_id=batch_id,
                    url=row.callback_url,
                    now=utcnow(),
                )
            ],
        )


@dataclass(frozen=True)
class ClaimedEvent:
    id: str
    api_key_id: uuid.UUID
    type: str
    task_id: uuid.UUID | None
    batch_id: uuid.UUID | None
    url: str
    attempt: int


class WebhookStore:
    def __init__(self, sessions: sessionmaker[Session]):
        self._sessions = sessions
        self._engine: Engine = sessions.kw["bind"]

    def new_for(self, *, task_id: uuid.UUID | None = None, batch_id: uuid.UUID | None = None) -> list[str]:
        """Events of this task or batch not yet tried: the ones to send now."""
        column, value = (WebhookEvent.task_id, task_id) if task_id else (WebhookEvent.batch_id, batch_id)
        with self._sessions() as session:
            return list(
                session.scalars(
                    select(WebhookEvent.id).where(
                        column == value, WebhookEvent.status == EventStatus.PENDING, WebhookEvent.attempts == 0
                    )
                )
            )

    def pending_key(self, event_id: str) -> uuid.UUID | None:
        """The API key of a pending event (None if it is not pending): whose share of the lane it takes."""
        with self._sessions() as session:
            return session.scalar(
                select(WebhookEvent.api_key_id).where(
                    WebhookEvent.id == event_id, WebhookEvent.status == EventStatus.PENDING
                )
            )

    def claim(self, event_id: str, lease_s: float) -> ClaimedEvent | Refused:
        """pending -> sending, one attempt more; refused if another delivery has it or it is done."""
        with self._engine.begin() as connection:
            row = transitions.claim(connection, event_id, now=utcnow(), lease_s=lease_s)
        return ClaimedEvent(*row) if row else row

    def is_disabled(self, event: ClaimedEvent) -> bool:
        with self._sessions() as session:
            return (
                session.scalar(
                    select(DisabledCallback.url).where(
                        DisabledCallback.api_key_id == event.api_key_id, DisabledCallback.url == event.url
                    )
                )
                is not None
            )

    def secrets(self, api_key_id: uuid.UUID) -> list[str]:
        """The key's signing secrets: the current one, and the previous one while its overlap lasts."""
        with self._sessions() as session:
            key = session.get(ApiKey, api_key_id)
        found = [key.webhook_secret] if key and key.webhook_secret else []
        if key and key.webhook_secret_previous and (key.webhook_secret_previous_until or utcnow()) > utcnow():
            found.append(key.webhook_secret_previous)
        return found

    def record(
        self,
        event: ClaimedEvent,
        *,
        status_code: int | None,
        latency_ms: int,
        error: str | None,
        outcome: EventStatus,
        retry_at: datetime | None = None,
    ) -> Outcome:
        """Record the attempt and move the event on: delivered, failed, disabled, or pending again at
        `retry_at`. The attempt is recorded even when the move is refused (its lease was taken back)."""
        with self._engine.begin() as connection:
            if outcome == EventStatus.PENDING:
                moved = transitions.retry(connection, event.id, event.attempt, at=retry_at or utcnow())
            else:
                moved = transitions.finish(connection, event.id, event.attempt, outcome)
            connection.execute(
                insert(WebhookDelivery).values(
                    id=uuid.uuid4(),
                    event_id=event.id,
                    attempt=event.attempt,
                    url=event.url,
                    status_code=status_code,
                    latency_ms=latency_ms,
                    error=error,
                    created_at=utcnow(),
                )
            )
            if outcome == EventStatus.DISABLED:
                insert_ignoring_conflict(
                    connection,
                    DisabledCallback,
                    {"api_key_id": event.api_key_id, "url": event.url, "disabled_at": utcnow()},
                )
        return moved

    def deliveries(
        self,
        api_key_id: uuid.UUID,
        *,
        task_id: uuid.UUID | None = None,
        batch_id: uuid.UUID | None = None,
        limit: int = 100,
    ) -> list[tuple[WebhookDelivery, WebhookEvent]]:
        query = (
            select(WebhookDelivery, WebhookEvent)
            .join(WebhookEvent)
            .where(WebhookEvent.api_key_id == api_key_id)
            .order_by(WebhookDelivery.created_at.desc())
            .limit(limit)
        )
        if task_id is not None:
            query = query.where(WebhookEvent.task_id == task_id)
        if batch_id is not None:
            query = query.where(WebhookEvent.batch_id == batch_id)
        with self._sessions() as session:
            return [tuple(row) for row in session.execute(query)]

    def redeliver(self, api_key_id: uuid.UUID, delivery_id: uuid.UUID) -> str | None:
        """Send a delivery's event again, now (unless an attempt is sending it); an explicit redelivery
        also lifts a 410's disabling. The event's id, None if no such delivery of this key's."""
        with self._engine.begin() as connection:
            event = connection.execute(
                select(WebhookEvent.id, WebhookEvent.url)
                .join(WebhookDelivery)
                .where(WebhookDelivery.id == delivery_id, WebhookEvent.api_key_id == api_key_id)
            ).one_or_none()
            if event is None:
                return None
            connection.execute(
                delete(DisabledCallback).where(
                    DisabledCallback.api_key_id == api_key_id, DisabledCallback.url == event.url
                )
            )
            transitions.redeliver(connection, event.id, now=utcnow())
            return event.id

    def overdue(self, republish_after_s: float, limit: int | None = None) -> list[str]:
        """Events whose message was lost (due long ago), left waiting by a full delivery lane, or whose
        sender died mid-attempt: send again, oldest first, at most `limit` of them."""
        if limit is not None and limit <= 0:
            return []
        with self._engine.begin() as connection:
            return transitions.take_back_overdue(connection, utcnow(), republish_after_s, limit)

    def overdue_count(self, republish_after_s: float, among: list[str] | None = None) -> int:
        """How many events overdue() would take (of those `among`, if given)."""
        query = (
            select(func.count()).select_from(WebhookEvent).where(transitions.is_overdue(utcnow(), republish_after_s))
        )
        if among is not None:
            if not among:
                return 0
            query = query.where(WebhookEvent.id.in_(among))
        with self._sessions() as session:
            return session.scalar(query)
