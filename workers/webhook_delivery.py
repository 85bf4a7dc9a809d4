"""Delivering one webhook event: claim it, build the payload fresh (image URLs signed now), sign,
POST, record the attempt, and schedule the next one if it failed.

Deliveries run in a lane of their own (DeliveryLane), never in the worker's Celery slots: a
receiver that never answers holds a lane slot for up to IMAGEGATE_WEBHOOK_TIMEOUT_S, and with
deliveries in the Celery slots 250 such callbacks delayed everyone's images by 15-36 s. The Celery
task only claims the event and hands it to the lane, so it returns at once.

When the lane is full, or the event's key already has its share of it, the event is not claimed:
it stays `pending` in the Postgres outbox, where it is durable, the message is acknowledged, and
the sweeper sends it again once it is overdue (WebhookStore.overdue). Delivery stays at-least-once
with nothing lost: an event leaves the outbox only when an attempt is recorded, and a worker that
dies mid-attempt leaves it `sending` under a lease the sweeper takes back.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import httpx
from celery import Celery

from imagegate.app.metrics import metrics
from imagegate.app.queue import publish_webhook
from imagegate.app.settings import Settings
from imagegate.app.state.webhook_events import EventStatus
from imagegate.app.stores.batches import BatchStore
from imagegate.app.stores.tasks import TaskStore
from imagegate.app.stores.webhooks import ClaimedEvent, WebhookStore
from imagegate.app.views import batch_view, task_view
from imagegate.workers import outbound
from imagegate.workers.webhook_post import deliver

log = logging.getLogger(__name__)

# The outcome label of imagegate_webhook_deliveries_total for each status an attempt leaves.
OUTCOME_LABELS = {
    EventStatus.DELIVERED: "delivered",
    EventStatus.PENDING: "retrying",
    EventStatus.FAILED: "failed",
    EventStatus.DISABLED: "disabled",
}


class DeliveryLane:
    """At most `size` deliveries at once in this process, at most `per_key` of them for one API key.
    Its threads are greenlets under the gevent pool; it starts on first use, so after a prefork fork."""

    def __init__(self, size: int, per_key: int):
        self.size, self.per_key = size, per_key
        self._lock = threading.Lock()
        self._by_key: Counter[uuid.UUID] = Counter()
        self._executor: ThreadPoolExecutor | None = None

    @property
    def busy(self) -> int:
        return sum(self._by_key.values())

    def enter(self, api_key_id: uuid.UUID) -> bool:
        """Take a slot for this key, or say no at once (never waits)."""
        with self._lock:
            if self.busy >= self.size or self._by_key[api_key_id] >= self.per_key:
                return False
            self._by_key[api_key_id] += 1
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.size, thread_name_prefix="webhook")
            return True

    def leave(self, api_key_id: uuid.UUID) -> None:
        with self._lock:
            self._by_key[api_key_id] -= 1
            if self._by_key[api_key_id] <= 0:
                del self._by_key[api_key_id]

    def submit(self, api_key_id: uuid.UUID, work) -> None:
        """Run work() in the lane; the slot taken by enter() is given back when it ends."""

        def run() -> None:
            try:
                work()
            except Exception:  # the event stays `sending` until its lease ends; the sweeper resends it
                log.exception("webhook delivery failed")
            finally:
                self.leave(api_key_id)

        self._executor.submit(run)


@dataclass
class WebhookSender:
    settings: Settings
    webhooks: WebhookStore
    tasks: TaskStore
    batches: BatchStore
    celery: Celery
    lane: DeliveryLane | None = field(default=None)
    # One client for every delivery: a new one per delivery would load the CA certificates each time.
    client: httpx.Client | None = field(default=None)

    def __post_init__(self) -> None:
        if self.lane is None:
            self.lane = DeliveryLane(self.settings.webhook_concurrency, self.settings.webhook_max_pending_per_key)
        if self.client is None:
            self.client = outbound.make_client(
                allow_private=self.settings.webhook_allow_private, max_connections=self.settings.webhook_concurrency
            )

    def run(self, event_id: str) -> None:
        """The Celery task's body: hand the event to the lane, or leave it in the outbox if the lane
        (or its key's share) is full. Returns at once either way."""
        api_key_id = self.webhooks.pending_key(event_id)
        if api_key_id is None:
            return  # a duplicate message, or already delivered
        if not self.lane.enter(api_key_id):
            log.debug("webhook %s waits in the outbox: the delivery lane is full for its key", event_id)
            metrics().webhook_lane_full.inc()
            return
        try:
            event = self.webhooks.claim(event_id, lease_s=self.settings.webhook_timeout_s + 30)
        except Exception:
            self.lane.leave(api_key_id)
            raise
        if not event:  # another delivery has it, or it is done
            self.lane.leave(api_key_id)
            return
        self.lane.submit(api_key_id, lambda: self.deliver(event))

    def deliver(self, event: ClaimedEvent) -> None:
        """One attempt of a claimed event, recorded; the next one scheduled if it failed."""
        if self.webhooks.is_disabled(event):
            self.webhooks.record(
                event,
                status_code=None,
                latency_ms=0,
                outcome=EventStatus.DISABLED,
                error="the callback URL answered 410 Gone earlier; redeliver to send again",
            )
            metrics().webhook_deliveries.labels(OUTCOME_LABELS[EventStatus.DISABLED]).inc()
            return
        body = json.dumps(self._payload(event), separators=(",", ":")).encode()
        result = deliver(
            self.client,
            event.url,
            body,
            {},
            secrets=self.webhooks.secrets(event.api_key_id),
            msg_id=event.id,
            timestamp=int(time.time()),
            deadline_s=self.settings.webhook_timeout_s,
        )
        schedule = self.settings.webhook_retry_delays_s
        delay = schedule[event.attempt - 1] if event.attempt <= len(schedule) else None
        if result.ok:
            outcome = EventStatus.DELIVERED
        elif result.disable:
            outcome = EventStatus.DISABLED
        else:
            outcome = EventStatus.PENDING if delay is not None else EventStatus.FAILED
        retry_at = datetime.now(UTC) + timedelta(seconds=delay) if outcome == EventStatus.PENDING else None
        self.webhooks.record(
            event,
            status_code=result.status,
            latency_ms=result.latency_ms,
            error=result.error,
            outcome=outcome,
            retry_at=retry_at,
        )
        metrics().webhook_deliveries.labels(OUTCOME_LABELS[outcome]).inc()
        metrics().webhook_delivery_duration.observe(result.latency_ms / 1000)
        log.info(
            "webhook %s attempt %s to %s: %s (%s)",
            event.id,
            event.attempt,
            event.url,
            outcome,
            result.status or result.error,
        )
        # Short waits go by countdown; longer ones than Redis keeps a message unacknowledged would
        # be delivered twice, so the sweeper sends those when they are due. RabbitMQ holds any
        # countdown itself (native delayed delivery), however long.
        if outcome == EventStatus.PENDING and (
            self.settings.uses_amqp or delay < self.settings.visibility_timeout_s / 2
        ):
            publish_webhook(self.celery, event.id, countdown=delay)

    def _payload(self, event: ClaimedEvent) -> dict:
        if event.task_id is not None:
            record = self.tasks.get(event.task_id)
            data = task_view(record, self.settings, as_urls=True).model_dump(mode="json", exclude_none=True)
        else:
            data = batch_view(*self.batches.get(event.batch_id, event.api_key_id)).model_dump(mode="json")
        return {"type": event.type, "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"), "data": data}
