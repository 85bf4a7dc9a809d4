"""What follows a task's end, wherever it ended (a worker, a cancel, the sweeper): wake the
synchronous requests waiting on it, send its webhook events, and close its batch if it was the last."""

from __future__ import annotations

import logging
import uuid

from celery import Celery

from imagegate.app.queue import publish_webhook
from imagegate.app.stores.batches import BatchStore
from imagegate.app.stores.webhooks import WebhookStore
from imagegate.app.wakeups import Wakeups, announce_quietly

log = logging.getLogger(__name__)


class AfterEnd:
    def __init__(self, events: Wakeups, webhooks: WebhookStore, batches: BatchStore, celery: Celery):
        self._events, self._webhooks, self._batches, self._celery = events, webhooks, batches, celery

    def task_ended(
        self,
        task_id: uuid.UUID,
        batch_id: uuid.UUID | None = None,
        *,
        has_callback: bool = True,
        reply: bytes | None = None,
    ) -> None:
        """`reply`: the body of a synchronous request's answer, handed over to it (see app/wakeups.py)."""
        announce_quietly(self._events, task_id, reply)
        if has_callback:  # a task without a callback URL has no event to look for
            self.send(self._webhooks.new_for(task_id=task_id))
        if batch_id is not None:
            self.batch_touched(batch_id)

    def batch_touched(self, batch_id: uuid.UUID) -> None:
        if self._batches.complete(batch_id):
            self.send(self._webhooks.new_for(batch_id=batch_id))

    def send(self, event_ids: list[str]) -> None:
        for event_id in event_ids:
            try:
                publish_webhook(self._celery, event_id)
            except Exception as exc:  # the event is in Postgres; the sweeper sends it later
                log.warning("could not publish webhook event %s: %s", event_id, exc)
