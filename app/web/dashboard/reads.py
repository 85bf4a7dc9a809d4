"""What the dashboard reads: pages of tasks and batches, the keys, one delivery's owner and the
health strip. SQLAlchemy Core, read only, every query bounded by a page size or a time window; it
runs on Postgres and on the embedded mode's SQLite file alike."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

from sqlalchemy import Engine, and_, case, func, or_, select

from imagegate.app.heartbeats import recent
from imagegate.app.ids import parse_id
from imagegate.app.models import ApiKey, Batch, Image, Task, WebhookDelivery, WebhookEvent, utcnow
from imagegate.app.queue import WORKER_QUEUES, messages_queued
from imagegate.app.state.tasks import ENDED, TaskStatus

log = logging.getLogger(__name__)

PAGE_SIZE = 25
PROMPT_CHARS = 160
ERROR_WINDOW_S = 300.0

Row = TypeVar("Row")


@dataclass(frozen=True)
class Cursor:
    """Where a page ends: (created_at, id) of its last row; the next page is strictly older."""

    created_at: datetime
    id: uuid.UUID

    def encode(self) -> str:
        return f"{self.created_at.timestamp():.6f}_{self.id}"

    @classmethod
    def decode(cls, text: str | None) -> Cursor | None:
        """The cursor a link carried, None (the first page) for anything malformed."""
        stamp, _, raw_id = (text or "").partition("_")
        task_id = parse_id(raw_id)
        try:
            created_at = datetime.fromtimestamp(float(stamp), tz=utcnow().tzinfo)
        except (ValueError, OverflowError, OSError):
            return None
        return cls(created_at, task_id) if task_id else None

    def older(self, created_at, row_id):
        """Rows after this cursor in newest-first order (no row-value comparison: SQLite too)."""
        return or_(created_at < self.created_at, and_(created_at == self.created_at, row_id < self.id))


@dataclass(frozen=True)
class TaskFilter:
    api_key_id: uuid.UUID | None = None  # None: every key's (the admin)
    status: str | None = None
    model: str | None = None
    batch_id: uuid.UUID | None = None


@dataclass(frozen=True)
class Thumbnail:
    image_id: uuid.UUID
    content_type: str


@dataclass(frozen=True)
class TaskRow:
    id: uuid.UUID
    created_at: datetime
    finished_at: datetime | None
    model: str
    status: str
    key_name: str
    batch_id: uuid.UUID | None
    prompt: str
    error_code: str | None
    thumbnail: Thumbnail | None = None


@dataclass(frozen=True)
class BatchRow:
    id: uuid.UUID
    created_at: datetime
    finished_at: datetime | None
    status: str
    total: int
    key_name: str
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ended(self) -> int:
        return sum(self.counts.get(status, 0) for status in ENDED)

    @property
    def percent_done(self) -> int:
        return round(100 * self.ended / self.total) if self.total else 100


@dataclass(frozen=True)
class Page(Generic[Row]):
    rows: list[Row]
    next: Cursor | None  # None: this is the last page


@dataclass(frozen=True)
class KeyRow:
    id: uuid.UUID
    name: str
    prefix: str
    revoked: bool


@dataclass(frozen=True)
class ErrorRate:
    model: str
    failed: int
    ended: int

    @property
    def percent(self) -> float:
        return 100 * self.failed / self.ended if self.ended else 0.0


@dataclass(frozen=True)
class Health:
    queues: dict[str, int] | None  # None: the filesystem broker, or the broker did not answer
    workers: int
    sweepers: int
    error_rates: list[ErrorRate]


def _page(rows: list, limit: int, cursor_of) -> tuple[list, Cursor | None]:
    """The first `limit` rows and, when there were more, the cursor after the last of them."""
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    return rows, cursor_of(rows[-1])


def tasks_page(engine: Engine, filters: TaskFilter, before: Cursor | None, limit: int = PAGE_SIZE) -> Page[TaskRow]:
    """Tasks newest first, with the first image of each succeeded one."""
    query = (
        select(
            Task.id,
            Task.created_at,
            Task.finished_at,
            Task.model,
            Task.status,
            ApiKey.name.label("key_name"),
            Task.batch_id,
            func.substr(Task.request["prompt"].as_string(), 1, PROMPT_CHARS).label("prompt"),
            Task.error_code,
        )
        .join(ApiKey, ApiKey.id == Task.api_key_id)
        .order_by(Task.created_at.desc(), Task.id.desc())
        .limit(limit + 1)
    )
    for column, value in (
        (Task.api_key_id, filters.api_key_id),
        (Task.status, filters.status),
        (Task.model, filters.model),
        (Task.batch_id, filters.batch_id),
    ):
        if value is not None:
            query = query.where(column == value)
    if before is not None:
        query = query.where(before.older(Task.created_at, Task.id))
    with engine.connect() as connection:
        rows, after = _page(connection.execute(query).all(), limit, lambda row: Cursor(row.created_at, row.id))
        thumbnails = _first_images(connection, [row.id for row in rows if row.status == TaskStatus.SUCCEED])
    return Page([TaskRow(**row._asdict(), thumbnail=thumbnails.get(row.id)) for row in rows], after)


def _first_images(connection, task_ids: list[uuid.UUID]) -> dict[uuid.UUID, Thumbnail]:
    if not task_ids:
        return {}
    rows = connection.execute(
        select(Image.task_id, Image.id, Image.content_type)
        .where(Image.task_id.in_(task_ids))
        .order_by(Image.task_id, Image.slot.desc(), Image.index.desc())
    )
    # Ordered last image first, so the first image of each task is the one left in the dict.
    return {row.task_id: Thumbnail(row.id, row.content_type) for row in rows}


def batches_page(
    engine: Engine, api_key_id: uuid.UUID | None, before: Cursor | None, limit: int = PAGE_SIZE
) -> Page[BatchRow]:
    """Batches newest first, each with its tasks counted by status."""
    query = (
        select(
            Batch.id,
            Batch.created_at,
            Batch.finished_at,
            Batch.status,
            Batch.total,
            ApiKey.name.label("key_name"),
        )
        .join(ApiKey, ApiKey.id == Batch.api_key_id)
        .order_by(Batch.created_at.desc(), Batch.id.desc())
        .limit(limit + 1)
    )
    if api_key_id is not None:
        query = query.where(Batch.api_key_id == api_key_id)
    if before is not None:
        query = query.where(before.older(Batch.created_at, Batch.id))
    with engine.connect() as connection:
        rows, after = _page(connection.execute(query).all(), limit, lambda row: Cursor(row.created_at, row.id))
        counts: dict[uuid.UUID, dict[str, int]] = {row.id: {} for row in rows}
        if rows:
            for batch_id, status, count in connection.execute(
                select(Task.batch_id, Task.status, func.count())
                .where(Task.batch_id.in_(list(counts)))
                .group_by(Task.batch_id, Task.status)
            ):
                counts[batch_id][status] = count
    return Page([BatchRow(**row._asdict(), counts=counts[row.id]) for row in rows], after)


def keys(engine: Engine) -> list[KeyRow]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(ApiKey.id, ApiKey.name, ApiKey.prefix, ApiKey.revoked_at).order_by(ApiKey.name, ApiKey.created_at)
        ).all()
    return [KeyRow(row.id, row.name, row.prefix, row.revoked_at is not None) for row in rows]


def live_key_name(engine: Engine, api_key_id: uuid.UUID) -> str | None:
    """The key's name while it is not revoked: a revoked key's dashboard session ends with it."""
    with engine.connect() as connection:
        return connection.scalar(select(ApiKey.name).where(ApiKey.id == api_key_id, ApiKey.revoked_at.is_(None)))


def key_name(engine: Engine, api_key_id: uuid.UUID) -> str | None:
    with engine.connect() as connection:
        return connection.scalar(select(ApiKey.name).where(ApiKey.id == api_key_id))


def delivery_owner(engine: Engine, delivery_id: uuid.UUID):
    """The API key, task and batch of the event a delivery attempt carried (a row), or None."""
    with engine.connect() as connection:
        return connection.execute(
            select(WebhookEvent.api_key_id, WebhookEvent.task_id, WebhookEvent.batch_id)
            .join(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id)
        ).one_or_none()


def error_rates(engine: Engine, api_key_id: uuid.UUID | None, task_deadline_s: float) -> list[ErrorRate]:
    """Per model, tasks failed of tasks ended in the last ERROR_WINDOW_S."""
    since = utcnow() - timedelta(seconds=ERROR_WINDOW_S)
    failed = func.sum(case((Task.status == TaskStatus.FAILED, 1), else_=0))
    query = (
        select(Task.model, failed.label("failed"), func.count().label("ended"))
        .where(
            Task.status.in_(ENDED),
            Task.finished_at >= since,
            # Every task ends within its deadline of intake (the sweeper fails it then), so this bound
            # lets the (status, created_at) index skip the older history, however long it is.
            Task.created_at >= since - timedelta(seconds=task_deadline_s + ERROR_WINDOW_S),
        )
        .group_by(Task.model)
        .order_by(Task.model)
    )
    if api_key_id is not None:
        query = query.where(Task.api_key_id == api_key_id)
    with engine.connect() as connection:
        return [ErrorRate(row.model, int(row.failed or 0), row.ended) for row in connection.execute(query)]


def queue_depths(broker: Any) -> dict[str, int] | None:
    """Messages waiting per queue, from a Redis or RabbitMQ broker; None without one or when it does not answer."""
    if broker is None:
        return None
    try:
        return messages_queued(broker, list(WORKER_QUEUES))
    except Exception as exc:  # the strip says n/a; the page itself must still render
        log.warning("queue depth unavailable: %s", exc)
        return None


def health(engine: Engine, broker: Any, api_key_id: uuid.UUID | None, task_deadline_s: float) -> Health:
    seen = recent(engine, 60, kind=None)
    return Health(
        queues=queue_depths(broker),
        workers=sum(1 for process in seen if process.kind == "worker"),
        sweepers=sum(1 for process in seen if process.kind == "sweeper"),
        error_rates=error_rates(engine, api_key_id, task_deadline_s),
    )
