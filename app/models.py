"""SQLAlchemy models: the tables both the web process and the workers use."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# JSONB on Postgres, plain JSON (text) elsewhere, e.g. the embedded SQLite file.
JsonDocument = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator):
    """A time stored with its zone and always read back aware: SQLite (the embedded mode) drops the
    zone, and a naive time subtracted from an aware one raises."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JsonDocument, datetime: UtcDateTime()}


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200))
    # The first characters of the key, to recognise it in listings; the key itself is never kept.
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]
    # Where this key's task and batch events go when a request names no callback_url.
    callback_url: Mapped[str | None] = mapped_column(Text)
    # Standard Webhooks signing secrets (whsec_...). They must be usable to sign, so unlike the key
    # they are kept as they are. During a rotation the previous one signs too, until the time given.
    webhook_secret: Mapped[str | None] = mapped_column(String(100))
    webhook_secret_previous: Mapped[str | None] = mapped_column(String(100))
    webhook_secret_previous_until: Mapped[datetime | None]
    # When an API process last authenticated it; written at most once a minute per key and process.
    last_used_at: Mapped[datetime | None]
    # The models this key may use (a JSON list of names); NULL: every model of the providers file.
    models: Mapped[list[str] | None] = mapped_column(
        JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
    )
    # Limits at intake (app/key_limits.py): NULL follows the IMAGEGATE_DEFAULT_* setting, 0 is no limit.
    rpm: Mapped[int | None] = mapped_column(Integer)
    images_per_day: Mapped[int | None] = mapped_column(Integer)
    max_pending: Mapped[int | None] = mapped_column(Integer)

    # A name means one live key; a revoked key's name may be given again.
    __table_args__ = (
        Index(
            "uq_api_keys_live_name",
            "name",
            unique=True,
            postgresql_where=text("revoked_at IS NULL"),
            sqlite_where=text("revoked_at IS NULL"),
        ),
    )


class Batch(Base):
    __tablename__ = "batches"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    api_key_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("api_keys.id"), index=True)
    # One of app.state.batches.BatchStatus (a CHECK constraint), written only there.
    status: Mapped[str] = mapped_column(String(16))
    total: Mapped[int] = mapped_column(Integer)
    callback_url: Mapped[str | None] = mapped_column(Text)
    meta: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class Task(Base):
    __tablename__ = "tasks"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    api_key_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("api_keys.id"), index=True)
    model: Mapped[str] = mapped_column(String(200))
    # One of app.state.tasks.TaskStatus (a CHECK constraint), written only by app.state.tasks and
    # app.state.attempts.
    status: Mapped[str] = mapped_column(String(16))
    # The validated request as the client sent it (aliases, no nulls).
    request: Mapped[dict[str, Any]]
    response_format: Mapped[str] = mapped_column(String(16))
    # Attempts (rounds) claimed so far; the guard that keeps one attempt to one call per slot.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # The model now serving the task: `model`, or one of its fallbacks.
    route: Mapped[str] = mapped_column(String(200))
    # Retries spent on upstream errors on this route (a worker lost is not the client's retry).
    retries_used: Mapped[int] = mapped_column(Integer, default=0)
    # A pending task is due from run_after (retry countdowns); the sweeper republishes one that is
    # long overdue, as its message was lost.
    run_after: Mapped[datetime] = mapped_column(default=utcnow)
    # Set while a pending task waits for room under its model's upstream limits: one of
    # app.state.tasks.QueuedReason (a CHECK constraint); cleared when an attempt is claimed.
    queued_reason: Mapped[str | None] = mapped_column(String(32))
    # A running attempt is owned until lease_expires_at; the sweeper takes back expired ones.
    lease_expires_at: Mapped[datetime | None]
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Where the task's end is announced (the request's callback_url, or its key's default).
    callback_url: Mapped[str | None] = mapped_column(Text)
    # Set for a batch's tasks: which batch, which line (0-based), and the line's custom_id.
    batch_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("batches.id"), index=True)
    batch_line: Mapped[int | None] = mapped_column(Integer)
    custom_id: Mapped[str | None] = mapped_column(String(200))
    # An asynchronous upstream's own task id, kept so a new attempt polls instead of resubmitting.
    upstream_task_id: Mapped[str | None] = mapped_column(String(200))
    # Poll steps taken in this attempt; guards against a duplicated poll message.
    polls: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200))
    usage: Mapped[dict[str, Any] | None]
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    error_details: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # The client deleted it (DELETE /v1/images/{id}): its images and request are gone, the row stays.
    deleted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    # When the task's image bytes were deleted for retention (or by `imagegate images purge`): it then
    # answers `data: []` and `expired: true`.
    images_expired_at: Mapped[datetime | None]

    __table_args__ = (
        Index("ix_tasks_status_created_at", "status", "created_at"),
        Index("ix_tasks_status_run_after", "status", "run_after"),
        Index("ix_tasks_status_lease_expires_at", "status", "lease_expires_at"),
        # Newest first, for one key (its own list) and for all (an admin's), paged by (created_at, id).
        Index("ix_tasks_api_key_id_created_at_id", "api_key_id", "created_at", "id"),
        Index("ix_tasks_created_at_id", "created_at", "id"),
        # The retention sweep: ended tasks whose images are still kept, oldest end first.
        Index(
            "ix_tasks_finished_at_images_kept",
            "finished_at",
            postgresql_where=text("images_expired_at IS NULL AND finished_at IS NOT NULL"),
            sqlite_where=text("images_expired_at IS NULL AND finished_at IS NOT NULL"),
        ),
        # A key's unfinished tasks, counted at intake against its max_pending (app/key_limits.py).
        Index(
            "ix_tasks_unfinished_api_key",
            "api_key_id",
            postgresql_where=text("status IN ('pending', 'running')"),
            sqlite_where=text("status IN ('pending', 'running')"),
        ),
    )


class Attempt(Base):
    """One upstream call: attempt `number` of the task, for its images in `slot` (fan-out)."""

    __tablename__ = "attempts"

    task_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True)
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    slot: Mapped[int] = mapped_column(Integer, primary_key=True, default=0)
    model: Mapped[str] = mapped_column(String(200))
    worker: Mapped[str | None] = mapped_column(String(200))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None]
    upstream_status: Mapped[int | None] = mapped_column(Integer)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)


class Image(Base):
    """A stored image (its bytes here or in the image store), so a result never expires with an
    upstream's link."""

    __tablename__ = "images"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    task_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    # Which fan-out call produced it, and its place among that call's images.
    slot: Mapped[int] = mapped_column(Integer, default=0)
    index: Mapped[int] = mapped_column(Integer)
    content_type: Mapped[str] = mapped_column(String(64))
    # The bytes (IMAGEGATE_IMAGE_STORE=postgres), or NULL and the key they were put under in the
    # image store (dir, s3): see app/image_store.py.
    data: Mapped[bytes | None] = mapped_column(LargeBinary)
    store_key: Mapped[str | None] = mapped_column(String(300))
    revised_prompt: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TaskInput(Base):
    """An input file of an edit task (an image to edit, or the mask), written with the task in its
    intake transaction and read by each attempt, so a retry or another worker has it; the sweeper
    deletes it once the task has ended. Kept apart from `tasks` so reading a task never loads it."""

    __tablename__ = "task_inputs"

    task_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True)
    role: Mapped[str] = mapped_column(String(8), primary_key=True)  # image | mask
    index: Mapped[int] = mapped_column(Integer, primary_key=True)  # the images' order (0 for the mask)
    content_type: Mapped[str] = mapped_column(String(64))
    filename: Mapped[str | None] = mapped_column(String(255))
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class IdempotencyKey(Base):
    """A client's Idempotency-Key: the same key and body give the same task or batch."""

    __tablename__ = "idempotency_keys"

    api_key_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("api_keys.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))  # SHA-256 of the canonical request
    task_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    batch_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class WebhookEvent(Base):
    """An event to deliver, written in the same transaction as the end it announces (an outbox).
    Its id is the webhook-id of every delivery attempt."""

    __tablename__ = "webhook_events"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    api_key_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("api_keys.id"), index=True)
    type: Mapped[str] = mapped_column(String(40))
    task_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, index=True)
    batch_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, index=True)
    url: Mapped[str] = mapped_column(Text)
    # One of app.state.webhook_events.EventStatus (a CHECK constraint), written only there.
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # When the next attempt is due; while sending, when the attempt counts as lost.
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_webhook_events_status_next_attempt_at", "status", "next_attempt_at"),)


class WebhookDelivery(Base):
    """One delivery attempt of an event: what the receiver answered, how fast, or what went wrong."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    event_id: Mapped[str] = mapped_column(ForeignKey("webhook_events.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    url: Mapped[str] = mapped_column(Text)
    status_code: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DisabledCallback(Base):
    """A callback URL that answered 410 Gone: no more events go there for this key."""

    __tablename__ = "disabled_callbacks"

    api_key_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("api_keys.id"), primary_key=True)
    url: Mapped[str] = mapped_column(Text, primary_key=True)
    disabled_at: Mapped[datetime] = mapped_column(default=utcnow)


class Heartbeat(Base):
    """A worker or sweeper process saying it is alive; /readyz and the dashboard read the recent ones."""

    __tablename__ = "heartbeats"

    # "{kind}:{hostname}:{pid}": one row per process, rewritten in place.
    id: Mapped[str] = mapped_column(String(300), primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))  # worker | sweeper
    hostname: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime]
    seen_at: Mapped[datetime] = mapped_column(index=True)
    info: Mapped[dict[str, Any]] = mapped_column(default=dict)
