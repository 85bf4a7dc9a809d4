"""The sweeper: Postgres is the source of truth and Celery only the transport, so whatever the
transport loses is found here and sent again.

Each pass, as single guarded UPDATEs (safe with several sweepers on several hosts):
- tasks past IMAGEGATE_TASK_DEADLINE_S fail `deadline_exceeded`;
- running attempts whose lease expired (worker killed, frozen, or its poll message lost) go back to
  pending and are republished, or fail `attempts_exhausted` / `cancelled`;
- the input files of ended edit tasks are deleted (their attempts are over);
- pending tasks overdue by IMAGEGATE_REPUBLISH_AFTER_S (committed but never published, or lost from a
  flushed broker) are republished. A duplicate message is harmless: a claim takes one delivery;
- the images of tasks ended more than IMAGEGATE_IMAGE_RETENTION_S ago are deleted, a small batch a pass.

With a Redis broker only what the broker really lost is republished: a 3,000-task backlog is
overdue as a whole while every message is still queued, and republishing it all every period sent
thousands of useless messages. Per lane (queue), the sweeper counts the overdue pending tasks and
the messages Redis holds for that lane (its lists, and those of kombu's `unacked` hash delivered
within IMAGEGATE_REPUBLISH_AFTER_S whose task is among the overdue) and republishes only the
difference, oldest first. (With RabbitMQ the lanes' ready messages are counted; a message a worker
holds unacknowledged is not seen, so its task may be republished once more: a duplicate its claim
ignores.) Every pending task has at least one message unless one was lost, so
the difference never exceeds what was lost; messages of running, retrying or ended tasks make it
smaller, never larger, so a lost message may wait until its lane has drained that far (it is never
dropped: the count catches up as the lane empties, and the task deadline bounds the wait). The
filesystem broker keeps the plain rule.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from imagegate.app.heartbeats import Heart
from imagegate.app.heartbeats import forget_old as forget_old_heartbeats
from imagegate.app.ids import parse_id
from imagegate.app.metrics import metrics
from imagegate.app.models import Task, utcnow
from imagegate.app.queue import (
    BATCH_QUEUE,
    QUEUE,
    WEBHOOK_QUEUE,
    broker_client,
    messages_queued,
    messages_unacked,
    publish_run,
)
from imagegate.app.runtime import Runtime, build_runtime
from imagegate.app.settings import Settings
from imagegate.app.state.tasks import is_overdue_pending, republish_overdue
from imagegate.app.stores.inputs import forget_ended as forget_ended_inputs
from imagegate.app.stores.tasks import Requeued

log = logging.getLogger(__name__)

_REPUBLISH_LOCK = 0x1A6E6A7E  # the advisory lock id of "counting and republishing lost messages"
# Webhook events resent per pass at most, oldest first: events a full delivery lane left in the
# outbox have no message, so without a cap 10,000 of them would be resent every period.
WEBHOOK_RESEND_PER_PASS = 500


def _ago(seconds: float) -> datetime:
    return utcnow() - timedelta(seconds=seconds)


@dataclass(frozen=True)
class SweepReport:
    overdue_failed: int = 0
    requeued: int = 0
    exhausted_failed: int = 0
    republished: int = 0
    publish_errors: int = 0
    images_expired: int = 0  # tasks whose images retention deleted

    def __bool__(self) -> bool:
        return any((self.overdue_failed, self.requeued, self.exhausted_failed, self.republished, self.images_expired))

    def count(self) -> None:
        """Add this pass to imagegate_sweeper_actions_total."""
        actions = metrics().sweeper_actions
        actions.labels("deadline_failed").inc(self.overdue_failed)
        actions.labels("taken_back").inc(self.requeued)
        actions.labels("attempts_exhausted").inc(self.exhausted_failed)
        actions.labels("republished").inc(self.republished)
        actions.labels("publish_failed").inc(self.publish_errors)
        actions.labels("images_expired").inc(self.images_expired)


@dataclass
class Sweeper:
    runtime: Runtime
    broker: Any = None  # a queue.broker_client (Redis or RabbitMQ): republish only what it lost

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    def sweep_once(self) -> SweepReport:
        overdue = self.runtime.tasks.fail_overdue(self.settings.task_deadline_s)
        requeued, exhausted = self.runtime.tasks.take_back_expired(self.settings.max_attempts)
        republished = self._lost_pending()
        ended = overdue + exhausted
        for task_id, batch_id in (self.runtime.tasks.batch_of(ended) if ended else {}).items():
            self.runtime.after_end.task_ended(task_id, batch_id)
        errors = sum(not self._publish(item) for item in requeued + republished)
        # Safety nets: webhook events whose message was lost, batches whose closing was missed.
        lost_events = self.runtime.webhooks.overdue(self.settings.republish_after_s, limit=self._lost_events())
        self.runtime.after_end.send(lost_events)
        for batch_id in self.runtime.batches.open_batches():
            self.runtime.after_end.batch_touched(batch_id)
        self.runtime.tasks.forget_idempotency_keys(self.settings.idempotency_ttl_s)
        forget_ended_inputs(self.runtime.engine)  # an ended edit's input files, a bounded number a pass
        forget_old_heartbeats(self.runtime.engine)
        expired = self._expire_images()
        report = SweepReport(len(overdue), len(requeued), len(exhausted), len(republished), errors, expired)
        report.count()
        if report:
            log.info("sweep: %s", report)
        return report

    def run(self, stop: threading.Event) -> None:
        heart = Heart(self.runtime.engine, "sweeper", {"interval_s": self.settings.sweep_interval_s})
        heart.start()
        while not stop.is_set():
            try:
                with metrics().sweep_duration.time():
                    self.sweep_once()
            except Exception:  # a database or broker outage: try again next period
                metrics().sweep_errors.inc()
                log.exception("sweep failed; retrying in %.0f s", self.settings.sweep_interval_s)
            stop.wait(self.settings.sweep_interval_s)
        heart.stop()

    def _expire_images(self) -> int:
        """Retention: the images of at most IMAGEGATE_IMAGE_RETENTION_BATCH tasks ended more than
        IMAGEGATE_IMAGE_RETENTION_S ago, a bounded piece of work per pass; 0 keeps images forever.
        Its own failure (the image store away) does not stop the pass's repairs, which ran first."""
        if not self.settings.image_retention_s:
            return 0
        try:
            purged = self.runtime.images.expire_ended_before(
                _ago(self.settings.image_retention_s), self.settings.image_retention_batch
            )
        except Exception as exc:
            log.warning("could not delete expired images (retrying next pass): %s", exc)
            return 0
        return purged.tasks

    def _lost_pending(self) -> list[Requeued]:
        if self.broker is None:
            return self.runtime.tasks.overdue_pending(self.settings.republish_after_s)
        lanes = {QUEUE: Task.batch_id.is_(None), BATCH_QUEUE: Task.batch_id.is_not(None)}
        with self.runtime.sessions.begin() as session:
            # One sweeper at a time counts and republishes, or two would both make up one deficit.
            if session.get_bind().dialect.name == "postgresql" and not session.scalar(
                select(func.pg_try_advisory_xact_lock(_REPUBLISH_LOCK))
            ):
                return []
            due_before = _ago(self.settings.republish_after_s)
            overdue = [is_overdue_pending(due_before)]
            due = {
                lane: session.scalar(select(func.count()).select_from(Task).where(*overdue, in_lane))
                for lane, in_lane in lanes.items()
            }

            def still_due(lane: str, ids: list[str]) -> int:
                parsed = [task_id for task_id in map(parse_id, ids) if task_id is not None]
                return (
                    session.scalar(
                        select(func.count()).select_from(Task).where(Task.id.in_(parsed), *overdue, lanes[lane])
                    )
                    if parsed
                    else 0
                )

            found: list[Requeued] = []
            for lane, count in self._deficit(due, still_due).items():
                rows = republish_overdue(session.connection(), due_before, lanes[lane], limit=count)
                found += [Requeued(row.id, row.attempts + 1, row.batch_id) for row in rows]
        return found

    def _lost_events(self) -> int:
        """How many overdue webhook events to send again: those with no message (all of them when
        there is no broker to ask), at most WEBHOOK_RESEND_PER_PASS."""
        if self.broker is None:
            return WEBHOOK_RESEND_PER_PASS
        webhooks = self.runtime.webhooks
        due = webhooks.overdue_count(self.settings.republish_after_s)
        lost = self._deficit(
            {WEBHOOK_QUEUE: due}, lambda _, ids: webhooks.overdue_count(self.settings.republish_after_s, among=ids)
        )
        return min(WEBHOOK_RESEND_PER_PASS, lost.get(WEBHOOK_QUEUE, 0))

    def _deficit(self, due: dict[str, int], still_due: Callable[[str, list[str]], int]) -> dict[str, int]:
        """Lanes whose overdue count exceeds the messages Redis holds for them, and by how much.
        Held: what waits in the lane's lists, plus the unacknowledged messages whose task is among
        the overdue (still_due counts those), so neither a running task's message nor a stale entry
        of an ended one hides a lost message. The lists are counted first; the hash is read only
        if a lane still looks short."""
        if not any(due.values()):
            return {}
        try:
            held = messages_queued(self.broker, list(due))
            short = {lane: due[lane] - held[lane] for lane in due if due[lane] > held[lane]}
            if not short:
                return {}
            unacked = messages_unacked(self.broker, list(short), delivered_within_s=self.settings.republish_after_s)
        except Exception as exc:  # Redis is away: nothing could be published now anyway
            log.warning("could not count the broker's messages: %s", exc)
            return {}
        short = {lane: missing - still_due(lane, unacked[lane]) for lane, missing in short.items()}
        return {lane: missing for lane, missing in short.items() if missing > 0}

    def _publish(self, item: Requeued) -> bool:
        try:
            publish_run(self.runtime.celery, item.task_id, item.attempt, batch_id=item.batch_id)
            return True
        except Exception as exc:  # still pending in Postgres: the next pass republishes it
            log.warning("could not publish task %s: %s", item.task_id, exc)
            return False


def make_sweeper(settings: Settings) -> Sweeper:
    return Sweeper(build_runtime(settings, pool_size=2), broker_client(settings, timeout_s=10))
