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
from dataclasses import dataclass

from celery import Celery

from app.endings import Endings
from app.queue import publish_run
from app.settings import Settings
from app.store import Requeued, TaskStore

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
    endings: Endings

    def sweep_once(self) -> SweepReport:
        overdue = self.store.fail_overdue(self.settings.task_deadline_s)
        requeued, exhausted = self.store.take_back_expired(self.settings.max_attempts)
        republished = self.store.overdue_pending(self.settings.republish_after_s)
        ended = overdue + exhausted
        for task_id, batch_id in (self.store.batch_of(ended) if ended else {}).items():
            self.endings.task_ended(task_id, batch_id)
        errors = sum(not self._publish(item) for item in requeued + republished)
        # Safety nets: webhook events whose message was lost, batches whose closing was missed.
        self.endings.send(self.endings.webhooks.overdue(self.settings.republish_after_s))
        for batch_id in self.endings.batches.open_batches():
            self.endings.batch_touched(batch_id)
        self.store.forget_idempotency_keys(self.settings.idempotency_ttl_s)
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

    def _publish(self, item: Requeued) -> bool:
        try:
            publish_run(self.celery, item.task_id, item.attempt, batch_id=item.batch_id)
            return True
        except Exception as exc:  # still pending in Postgres: the next pass republishes it
            log.warning("could not publish task %s: %s", item.task_id, exc)
            return False


def make_sweeper(settings: Settings) -> Sweeper:
    from app.db import make_engine, make_sessionmaker
    from app.events import make_task_events
    from app.queue import make_celery

    sessions = make_sessionmaker(make_engine(settings.database_url, pool_size=2))
    celery = make_celery(settings)
    return Sweeper(settings, TaskStore(sessions), celery,
                   Endings.make(sessions, make_task_events(settings.broker_url), celery))
