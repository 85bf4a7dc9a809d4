"""Delivering one webhook event: claim it, build the payload fresh (image URLs signed now), sign,
POST, record the attempt, and schedule the next one if it failed."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from celery import Celery

from app.batches import BatchStore
from app.queue import publish_webhook
from app.settings import Settings
from app.store import TaskStore
from app.views import batch_view, task_view
from app.webhook_events import ClaimedEvent, WebhookStore
from workers.webhooks import deliver, retry_schedule

log = logging.getLogger(__name__)


@dataclass
class WebhookSender:
    settings: Settings
    webhooks: WebhookStore
    tasks: TaskStore
    batches: BatchStore
    celery: Celery

    def run(self, event_id: str) -> None:
        event = self.webhooks.claim(event_id, lease_s=self.settings.webhook_timeout_s + 30)
        if event is None:
            return  # a duplicate message, or already delivered
        if self.webhooks.is_disabled(event):
            self.webhooks.record(event, status_code=None, latency_ms=0, outcome="disabled",
                                 error="the callback URL answered 410 Gone earlier; redeliver to send again")
            return
        body = json.dumps(self._payload(event), separators=(",", ":")).encode()
        result = deliver(event.url, body, {}, secrets=self.webhooks.secrets(event.api_key_id), msg_id=event.id,
                         timestamp=int(time.time()), allow_private=self.settings.webhook_allow_private,
                         deadline_s=self.settings.webhook_timeout_s)
        schedule = retry_schedule(self.settings.webhook_retry_schedule)
        delay = schedule[event.attempt - 1] if event.attempt <= len(schedule) else None
        if result.ok:
            outcome = "delivered"
        elif result.disable:
            outcome = "disabled"
        else:
            outcome = "pending" if delay is not None else "failed"
        retry_at = datetime.now(timezone.utc) + timedelta(seconds=delay) if outcome == "pending" else None
        self.webhooks.record(event, status_code=result.status, latency_ms=result.latency_ms, error=result.error,
                             outcome=outcome, retry_at=retry_at)
        log.info("webhook %s attempt %s to %s: %s (%s)", event.id, event.attempt, event.url, outcome,
                 result.status or result.error)
        # Short waits go by countdown; longer ones than Redis keeps a message unacknowledged would
        # be delivered twice, so the sweeper sends those when they are due.
        if outcome == "pending" and delay < self.settings.visibility_timeout_s / 2:
            publish_webhook(self.celery, event.id, countdown=delay)

    def _payload(self, event: ClaimedEvent) -> dict:
        if event.task_id is not None:
            record = self.tasks.get(event.task_id, as_urls=True)
            data = task_view(record, self.settings, as_urls=True).model_dump(mode="json", exclude_none=True)
        else:
            data = batch_view(*self.batches.get(event.batch_id, event.api_key_id)).model_dump(mode="json")
        return {"type": event.type, "timestamp": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
                "data": data}
