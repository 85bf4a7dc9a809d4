"""/v1/webhooks: every delivery attempt of a key's events, and sending an event again."""

from __future__ import annotations

import logging
import math
import time
import uuid

from flask import Blueprint, current_app, g

from imagegate.app.ids import parse_id
from imagegate.app.schemas import DeliveryList, DeliveryQuery, DeliveryView, RedeliveryQueued
from imagegate.app.web.auth import require_api_key
from imagegate.app.web.errors import ApiError, error_response
from imagegate.app.web.operations import Reply, operation
from imagegate.app.web.params import id_param, query_params
from imagegate.app.web.services import services

log = logging.getLogger(__name__)
bp = Blueprint("webhooks", __name__, url_prefix="/v1/webhooks")
bp.before_request(require_api_key)


@bp.get("/deliveries")
@operation(
    operation_id="listWebhookDeliveries",
    summary="Delivery attempts of the key's webhook events",
    query=DeliveryQuery,
    replies={200: Reply("Newest first", DeliveryList)},
    errors=(400, 401, 503),
)
def list_deliveries():
    """?task_id=... or ?batch_id=... (else the key's latest); newest first."""
    query = query_params(DeliveryQuery)
    rows = services().webhooks.deliveries(
        g.api_key_id,
        task_id=id_param("task_id", query.task_id),
        batch_id=id_param("batch_id", query.batch_id),
        limit=query.limit,
    )
    return DeliveryList(
        data=[
            DeliveryView(
                id=str(delivery.id),
                event_id=event.id,
                type=event.type,
                task_id=str(event.task_id) if event.task_id else None,
                batch_id=str(event.batch_id) if event.batch_id else None,
                attempt=delivery.attempt,
                url=delivery.url,
                status_code=delivery.status_code,
                latency_ms=delivery.latency_ms,
                error=delivery.error,
                created=int(delivery.created_at.timestamp()),
            )
            for delivery, event in rows
        ]
    ).model_dump(mode="json")


def _redeliver_limit():
    """A fixed window per API key, counted in Redis so every API process shares it (in memory with
    the embedded mode's filesystem broker): redelivering is a way to make us send requests."""
    found = current_app.extensions.get("imagegate.redeliver_limit")
    if found is None:
        from limits import parse, storage, strategies

        settings = services().settings
        store = storage.storage_from_string(settings.shared_redis_url or "memory://")
        found = current_app.extensions["imagegate.redeliver_limit"] = (
            strategies.FixedWindowRateLimiter(store),
            parse(settings.redeliver_rate),
        )
    return found


def redeliver_refused(api_key_id: uuid.UUID) -> tuple[str, int] | None:
    """None when this key may redeliver now (counted); else (the rate, seconds until it may)."""
    limiter, rate = _redeliver_limit()
    try:
        if limiter.hit(rate, "redeliver", str(api_key_id)):
            return None
    except Exception as exc:  # Redis away: the event is in Postgres anyway, and the sweeper sends it
        log.warning("redeliver rate limit unavailable: %s", exc)
        return None
    reset_at, _ = limiter.get_window_stats(rate, "redeliver", str(api_key_id))
    return str(rate), max(1, math.ceil(reset_at - time.time()))


@bp.post("/deliveries/<delivery_id>/redeliver")
@operation(
    operation_id="redeliverWebhook",
    summary="Send a delivery's event again",
    replies={202: Reply("Queued", RedeliveryQueued)},
    errors=(401, 404, 429, 503),
)
def redeliver(delivery_id: str):
    svc = services()
    if refused := redeliver_refused(g.api_key_id):
        rate, wait_s = refused
        response = error_response(
            429,
            f"Too many redeliveries for this API key (at most {rate}); try again later.",
            type="rate_limit_error",
            code="rate_limit_exceeded",
        )
        response.headers["Retry-After"] = str(wait_s)
        return response
    parsed = parse_id(delivery_id)
    event_id = svc.webhooks.redeliver(g.api_key_id, parsed) if parsed else None
    if event_id is None:
        raise ApiError(
            404, f"No delivery found with id '{delivery_id}'.", param="delivery_id", code="delivery_not_found"
        )
    svc.after_end.send([event_id])
    return RedeliveryQueued(event_id=event_id).model_dump(mode="json"), 202
