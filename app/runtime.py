"""The composition root: the one place a process's runtime is built from its Settings.

The API, the worker and the sweeper each call `build_runtime` and add only what is theirs: the API
its key cache, the worker its adapters and runner, the sweeper its broker counter.
"""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from imagegate.app.after_end import AfterEnd
from imagegate.app.db import make_engine, make_sessionmaker
from imagegate.app.image_store import ImageStore, make_image_store
from imagegate.app.queue import make_celery
from imagegate.app.settings import Settings
from imagegate.app.stores.batches import BatchStore
from imagegate.app.stores.images import ImageRecords
from imagegate.app.stores.tasks import TaskStore
from imagegate.app.stores.webhooks import WebhookStore
from imagegate.app.wakeups import Wakeups, make_wakeups


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    celery: Celery
    wakeups: Wakeups
    tasks: TaskStore
    batches: BatchStore
    webhooks: WebhookStore
    after_end: AfterEnd
    # Where image bytes live (IMAGEGATE_IMAGE_STORE), and deleting them (retention, a task's delete).
    image_store: ImageStore
    images: ImageRecords


def build_runtime(
    settings: Settings, *, pool_size: int = 10, max_overflow: int | None = None, by_key_only: bool = False
) -> Runtime:
    """No ping before each checkout: a connection broken by a Postgres restart fails one statement,
    the pool then drops them all, and the caller retries or the sweeper recovers what it was doing.
    by_key_only: the process's statements all use an index (app/db.py)."""
    engine = make_engine(
        settings.database_url, pool_size=pool_size, max_overflow=max_overflow, pre_ping=False, by_key_only=by_key_only
    )
    sessions = make_sessionmaker(engine)
    celery, wakeups = make_celery(settings), make_wakeups(settings.shared_redis_url or settings.broker_url)
    batches, webhooks = BatchStore(sessions), WebhookStore(sessions)
    image_store = make_image_store(settings)
    presign_ttl_s = settings.image_url_ttl_s if settings.image_urls == "store" else None
    return Runtime(
        settings=settings,
        engine=engine,
        sessions=sessions,
        celery=celery,
        wakeups=wakeups,
        tasks=TaskStore(sessions, image_store, presign_ttl_s=presign_ttl_s),
        batches=batches,
        webhooks=webhooks,
        after_end=AfterEnd(wakeups, webhooks, batches, celery),
        image_store=image_store,
        images=ImageRecords(engine, image_store),
    )
