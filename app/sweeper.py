"""The sweeper: Postgres is the source of truth and Celery only the transport, so whatever the
transport loses is found here and sent again.

Each pass, as single guarded UPDATEs (safe with several sweepers on several hosts):
- tasks past IMAGEGATE_TASK_DEADLINE_S fail `deadline_exceeded`;
- running attempts whose lease expired (worker killed, frozen, or its poll message lost) go back to
  pending and are republished, or fail `attempts_exhausted` / `cancelled`;
- pending tasks overdue by IMAGEGATE_REPUBLISH_AFTER_S (committed but never published, or lost from a
  flushed broker) are republished. A duplicate message is harmless: a claim takes one delivery.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass

from celery import Celery

from app.events import TaskEvents, announce_quietly
from app.queue import publish_run
from app.settings import Settings
from app.store import TaskStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepReport:
    overdue_failed: int = 0
    requeued: int = 0
    exhausted_failed: int = 0
    republished: int = 0
    publish_errors: int = 0

    def __bool__(self) -> bool:
        return any((self.overdue_failed, self.requeued, self.exhausted_failed, self.republished))


@dataclass
class Sweeper:
    settings: Settings
    store: TaskStore
    celery: Celery
    events: TaskEvents

    def sweep_once(self) -> SweepReport:
        overdue = self.store.fail_overdue(self.settings.task_deadline_s)
        requeued, exhausted = self.store.take_back_expired(self.settings.max_attempts)
        republished = self.store.overdue_pending(self.settings.republish_after_s)
        for task_id in overdue + exhausted:
            announce_quietly(self.events, task_id)
        errors = sum(not self._publish(task_id, attempt) for task_id, attempt in requeued + republished)
        report = SweepReport(len(overdue), len(requeued), len(exhausted), len(republished), errors)
        if report:
            log.info("sweep: %s", report)
        return report

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.sweep_once()
            except Exception:  # a database or broker outage: try again next period
                log.exception("sweep failed; retrying in %.0f s", self.settings.sweep_interval_s)
            stop.wait(self.settings.sweep_interval_s)

    def _publish(self, task_id: uuid.UUID, attempt: int) -> bool:
        try:
            publish_run(self.celery, task_id, attempt)
            return True
        except Exception as exc:  # still pending in Postgres: the next pass republishes it
            log.warning("could not publish task %s: %s", task_id, exc)
            return False


def make_sweeper(settings: Settings) -> Sweeper:
    from app.db import make_engine, make_sessionmaker
    from app.events import make_task_events
    from app.queue import make_celery

    sessions = make_sessionmaker(make_engine(settings.database_url, pool_size=2))
    return Sweeper(settings, TaskStore(sessions), make_celery(settings), make_task_events(settings.broker_url))
