"""Webhook events: written in the same transaction as the end they announce (an outbox), then
delivered by the workers with retries. An event's id is the webhook-id of every attempt."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, insert, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.models import ApiKey, Batch, DisabledCallback, Task, WebhookDelivery, WebhookEvent, utcnow
from app.states import TaskStatus

BATCH_COMPLETED = "image.batch.completed"


def task_event_type(status: str) -> str:
    return f"image.task.{status}"


def _not_disabled(api_key_column, url_column):
    return ~select(DisabledCallback.url).where(DisabledCallback.api_key_id == api_key_column,
                                              DisabledCallback.url == url_column).exists()


def enqueue_task_events(session: Session, task_ids: list[uuid.UUID]) -> None:
    """Events for those of these tasks that ended and have a callback URL not disabled for their key."""
    if not task_ids:
        return
    rows = session.execute(select(Task.id, Task.api_key_id, Task.status, Task.callback_url).where(
        Task.id.in_(task_ids), Task.callback_url.is_not(None), Task.status.in_((TaskStatus.SUCCEED, TaskStatus.FAILED)),
        _not_disabled(Task.api_key_id, Task.callback_url))).all()
    now = utcnow()
    if rows:
        session.execute(insert(WebhookEvent), [
            {"id": f"msg_{uuid.uuid4().hex}", "api_key_id": row.api_key_id, "type": task_event_type(row.status),
             "task_id": row.id, "url": row.callback_url, "status": "pending", "attempts": 0,
             "next_attempt_at": now, "created_at": now} for row in rows])


def enqueue_batch_event(session: Session, batch_id: uuid.UUID) -> None:
    row = session.execute(select(Batch.api_key_id, Batch.callback_url).where(
        Batch.id == batch_id, Batch.callback_url.is_not(None), _not_disabled(Batch.api_key_id, Batch.callback_url))
    ).one_or_none()
    if row is not None:
        now = utcnow()
        session.execute(insert(WebhookEvent).values(
            id=f"msg_{uuid.uuid4().hex}", api_key_id=row.api_key_id, type=BATCH_COMPLETED, batch_id=batch_id,
            url=row.callback_url, status="pending", attempts=0, next_attempt_at=now, created_at=now))


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

    def new_for(self, *, task_id: uuid.UUID | None = None, batch_id: uuid.UUID | None = None) -> list[str]:
        """Events of this task or batch not yet tried: the ones to send now."""
        column, value = (WebhookEvent.task_id, task_id) if task_id else (WebhookEvent.batch_id, batch_id)
        with self._sessions() as session:
            return list(session.scalars(select(WebhookEvent.id).where(
                column == value, WebhookEvent.status == "pending", WebhookEvent.attempts == 0)))

    def pending_key(self, event_id: str) -> uuid.UUID | None:
        """The API key of a pending event (None if it is not pending): whose share of the lane it takes."""
        with self._sessions() as session:
            return session.scalar(select(WebhookEvent.api_key_id).where(WebhookEvent.id == event_id,
                                                                        WebhookEvent.status == "pending"))

    def claim(self, event_id: str, lease_s: float) -> ClaimedEvent | None:
        """pending -> sending, one attempt more; None if another delivery has it or it is done."""
        with self._sessions.begin() as session:
            row = session.execute(
                update(WebhookEvent).where(WebhookEvent.id == event_id, WebhookEvent.status == "pending")
                .values(status="sending", attempts=WebhookEvent.attempts + 1,
                        next_attempt_at=utcnow() + timedelta(seconds=lease_s))
                .returning(WebhookEvent.id, WebhookEvent.api_key_id, WebhookEvent.type, WebhookEvent.task_id,
                           WebhookEvent.batch_id, WebhookEvent.url, WebhookEvent.attempts)
                .execution_options(synchronize_session=False)).one_or_none()
        return ClaimedEvent(*row) if row else None

    def is_disabled(self, event: ClaimedEvent) -> bool:
        with self._sessions() as session:
            return session.scalar(select(DisabledCallback.url).where(
                DisabledCallback.api_key_id == event.api_key_id, DisabledCallback.url == event.url)) is not None

    def secrets(self, api_key_id: uuid.UUID) -> list[str]:
        """The key's signing secrets: the current one, and the previous one while its overlap lasts."""
        with self._sessions() as session:
            key = session.get(ApiKey, api_key_id)
        found = [key.webhook_secret] if key and key.webhook_secret else []
        if key and key.webhook_secret_previous and (key.webhook_secret_previous_until or utcnow()) > utcnow():
            found.append(key.webhook_secret_previous)
        return found

    def record(self, event: ClaimedEvent, *, status_code: int | None, latency_ms: int, error: str | None,
               outcome: str, retry_at: datetime | None = None) -> bool:
        """Record the attempt and move the event on: delivered, failed, disabled, or pending again."""
        with self._sessions.begin() as session:
            values = {"status": outcome} | ({"next_attempt_at": retry_at} if retry_at else {})
            moved = session.execute(
                update(WebhookEvent).where(WebhookEvent.id == event.id, WebhookEvent.status == "sending",
                                           WebhookEvent.attempts == event.attempt).values(**values)
                .execution_options(synchronize_session=False)).rowcount == 1
            session.execute(insert(WebhookDelivery).values(
                id=uuid.uuid4(), event_id=event.id, attempt=event.attempt, url=event.url, status_code=status_code,
                latency_ms=latency_ms, error=error, created_at=utcnow()))
            if outcome == "disabled":
                from app.idempotency import insert_ignoring_conflict

                insert_ignoring_conflict(session, DisabledCallback, {"api_key_id": event.api_key_id, "url": event.url,
                                                                     "disabled_at": utcnow()})
        return moved

    def deliveries(self, api_key_id: uuid.UUID, *, task_id: uuid.UUID | None = None,
                   batch_id: uuid.UUID | None = None, limit: int = 100) -> list[tuple[WebhookDelivery, WebhookEvent]]:
        query = (select(WebhookDelivery, WebhookEvent).join(WebhookEvent)
                 .where(WebhookEvent.api_key_id == api_key_id)
                 .order_by(WebhookDelivery.created_at.desc()).limit(limit))
        if task_id is not None:
            query = query.where(WebhookEvent.task_id == task_id)
        if batch_id is not None:
            query = query.where(WebhookEvent.batch_id == batch_id)
        with self._sessions() as session:
            return [tuple(row) for row in session.execute(query)]

    def redeliver(self, api_key_id: uuid.UUID, delivery_id: uuid.UUID) -> str | None:
        """Send a delivery's event again, now; an explicit redelivery also lifts a 410's disabling."""
        with self._sessions.begin() as session:
            event = session.execute(select(WebhookEvent).join(WebhookDelivery).where(
                WebhookDelivery.id == delivery_id, WebhookEvent.api_key_id == api_key_id)).scalar_one_or_none()
            if event is None:
                return None
            session.execute(delete(DisabledCallback).where(DisabledCallback.api_key_id == api_key_id,
                                                           DisabledCallback.url == event.url))
            session.execute(update(WebhookEvent).where(WebhookEvent.id == event.id, WebhookEvent.status != "sending")
                            .values(status="pending", next_attempt_at=utcnow())
                            .execution_options(synchronize_session=False))
            return event.id

    def overdue(self, republish_after_s: float, limit: int | None = None) -> list[str]:
        """Events whose message was lost (due long ago), left waiting by a full delivery lane, or whose
        sender died mid-attempt: send again, oldest first, at most `limit` of them."""
        if limit is not None and limit <= 0:
            return []
        with self._sessions.begin() as session:
            oldest = (select(WebhookEvent.id).where(self._overdue(republish_after_s))
                      .order_by(WebhookEvent.next_attempt_at).limit(limit))
            return list(session.scalars(
                update(WebhookEvent).where(WebhookEvent.id.in_(oldest.scalar_subquery()),
                                           self._overdue(republish_after_s))
                .values(status="pending", next_attempt_at=utcnow()).returning(WebhookEvent.id)
                .execution_options(synchronize_session=False)))

    def overdue_count(self, republish_after_s: float, among: list[str] | None = None) -> int:
        """How many events overdue() would take (of those `among`, if given)."""
        query = select(func.count()).select_from(WebhookEvent).where(self._overdue(republish_after_s))
        if among is not None:
            if not among:
                return 0
            query = query.where(WebhookEvent.id.in_(among))
        with self._sessions() as session:
            return session.scalar(query)

    @staticmethod
    def _overdue(republish_after_s: float):
        now = utcnow()
        return or_((WebhookEvent.status == "pending")
                   & (WebhookEvent.next_attempt_at < now - timedelta(seconds=republish_after_s)),
                   (WebhookEvent.status == "sending") & (WebhookEvent.next_attempt_at < now))
