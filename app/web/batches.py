"""/v1/images/batches: many generation requests at once, as JSON or as OpenAI Batch-style JSONL."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Any

from flask import Blueprint, Response, g, request
from pydantic import ValidationError

from app.batches import NewLine
from app.idempotency import IdempotencyMismatch
from app.queue import publish_runs
from app.schemas import BatchLine
from app.state.tasks import TaskStatus
from app.store import parse_task_id
from app.views import batch_view
from app.signing import signed_image_url
from app.web.auth import require_api_key
from app.web.errors import ApiError, from_validation_error
from app.web.limits import read_body
from app.web.intake import checked_callback, checked_model, default_callback, idempotency
from app.web.services import Services, services

log = logging.getLogger(__name__)

bp = Blueprint("batches", __name__, url_prefix="/v1/images/batches")
bp.before_request(require_api_key)


@bp.before_request
def _batch_body_limit() -> None:
    # A batch body is thousands of requests: it has a limit of its own (IMAGEGATE_MAX_BATCH_BYTES).
    request.max_content_length = services().settings.max_batch_bytes

MAX_REPORTED_ERRORS = 1000


def _documents(svc: Services) -> tuple[list[Any], dict[str, Any]]:
    """The lines, and the batch options (callback_url, metadata) of a JSON body."""
    raw = read_body(svc.settings.body_timeout_s)
    try:
        document = json.loads(raw)
    except ValueError:
        document = None
    if isinstance(document, dict) and "requests" in document:
        unknown = set(document) - {"requests", "callback_url", "metadata"}
        if unknown:
            raise ApiError(400, f"Unrecognized request argument supplied: {sorted(unknown)[0]}",
                           param=sorted(unknown)[0], code="unknown_parameter")
        if not isinstance(document["requests"], list):
            raise ApiError(400, "'requests' must be a list.", param="requests", code="invalid_value")
        return document["requests"], document
    lines = []  # JSONL: one {"custom_id", "body"} per line, as OpenAI's Batch API input
    # Split on "\n" only: str.splitlines() would also cut at U+2028 inside a JSON string.
    for number, text in enumerate(raw.split(b"\n"), 1):
        if text.strip():
            try:
                lines.append(json.loads(text))
            except ValueError:
                lines.append(_BadJson(number))
    return lines, {}


class _BadJson:
    def __init__(self, number: int):
        self.number = number


def _checked_lines(svc: Services, documents: list[Any]) -> list[NewLine]:
    """Every line validated; any bad line refuses the whole batch, naming each bad line."""
    if not documents:
        raise ApiError(400, "The batch has no requests.", param="requests", code="empty_batch")
    if len(documents) > svc.settings.max_batch:
        raise ApiError(400, f"A batch takes at most {svc.settings.max_batch} requests; this one has "
                            f"{len(documents)}.", param="requests", code="batch_too_large")
    lines, errors, seen = [], [], set()
    for number, document in enumerate(documents, 1):
        custom_id = document.get("custom_id") if isinstance(document, dict) else None
        try:
            if isinstance(document, _BadJson):
                raise ApiError(400, "not valid JSON", code="invalid_json")
            try:
                line = BatchLine.model_validate(document, strict=True)
            except ValidationError as exc:
                raise from_validation_error(exc) from None
            if line.custom_id in seen:
                raise ApiError(400, f"custom_id {line.custom_id!r} is used by an earlier line", param="custom_id",
                               code="duplicate_custom_id")
            seen.add(line.custom_id)
            model_name, _ = checked_model(svc, line.body, prefix="body.")
            callback = checked_callback(svc, line.body.callback_url, param="body.callback_url")
            lines.append(NewLine(line.custom_id, model_name, line.body, callback))
        except ApiError as exc:
            if len(errors) < MAX_REPORTED_ERRORS:
                errors.append({"line": number, "custom_id": custom_id if isinstance(custom_id, str) else None,
                               "param": exc.param, "message": exc.message})
    if errors:
        raise ApiError(400, f"{len(errors)} line(s) of the batch are invalid; nothing was accepted.",
                       param="requests", code="invalid_batch", extra={"lines": errors})
    return lines


def _publish_in_background(svc: Services, task_ids: list[uuid.UUID], batch_id: uuid.UUID) -> None:
    """Answer at once; a batch's thousands of messages go out after, in pipelined chunks, yielding to
    other requests between chunks (under gevent this thread is a greenlet). Whatever this misses (a
    crash half-way), the sweeper republishes: the tasks are committed pending."""
    def publish() -> None:
        try:
            publish_runs(svc.celery, task_ids, batch_id=batch_id, between_chunks=lambda: time.sleep(0))
        except Exception:
            log.exception("could not publish batch %s; the sweeper will", batch_id)

    threading.Thread(target=publish, name=f"publish-{batch_id}", daemon=True).start()


@bp.post("")
@bp.post("/")
def create_batch():
    svc = services()
    documents, options = _documents(svc)
    metadata = options.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise ApiError(400, "'metadata' must be an object.", param="metadata", code="invalid_value")
    if "callback_url" in options and not isinstance(options["callback_url"], str):
        raise ApiError(400, "'callback_url' must be a string.", param="callback_url", code="invalid_value")
    callback_url = checked_callback(svc, options.get("callback_url")) or default_callback()
    lines = _checked_lines(svc, documents)
    fingerprinted = {"requests": [{"custom_id": line.custom_id, "body": line.body.stored()} for line in lines],
                     "callback_url": options.get("callback_url"), "metadata": metadata}
    try:
        batch, task_ids = svc.batches.create(api_key_id=g.api_key_id, lines=lines, callback_url=callback_url,
                                                     metadata=metadata, idempotency=idempotency(fingerprinted))
    except IdempotencyMismatch:
        raise ApiError(422, "This Idempotency-Key was already used with a different request body.",
                       param="Idempotency-Key", code="idempotency_key_reused") from None
    if task_ids:
        _publish_in_background(svc, task_ids, batch.id)
    counts = {TaskStatus.PENDING: len(task_ids)} if task_ids else svc.batches.get(batch.id, g.api_key_id)[1]
    headers = {} if task_ids else {"Idempotent-Replayed": "true"}
    return batch_view(batch, counts).model_dump(mode="json"), 202, headers


def _owned(batch_id: str):
    parsed = parse_task_id(batch_id)
    found = services().batches.get(parsed, g.api_key_id) if parsed else None
    if found is None:
        raise ApiError(404, f"No batch found with id '{batch_id}'.", param="batch_id", code="batch_not_found")
    return found


@bp.get("/<batch_id>")
def get_batch(batch_id: str):
    return batch_view(*_owned(batch_id)).model_dump(mode="json")


@bp.post("/<batch_id>/cancel")
def cancel_batch(batch_id: str):
    svc = services()
    batch, _ = _owned(batch_id)
    svc.batches.cancel(batch.id, g.api_key_id)
    svc.after_end.batch_touched(batch.id)  # closes it now if nothing was running
    return batch_view(*_owned(batch_id)).model_dump(mode="json")


@bp.get("/<batch_id>/results")
def batch_results(batch_id: str):
    """JSONL, one line per request in the order of the batch's lines, streamed page by page."""
    svc = services()
    batch, _ = _owned(batch_id)
    settings = svc.settings

    def lines():
        for row in svc.batches.results(batch.id):
            line: dict[str, Any] = {"custom_id": row.custom_id, "task_id": str(row.task.id),
                                    "task_status": row.task.status}
            if row.task.status == TaskStatus.SUCCEED:
                line["data"] = [{"url": signed_image_url(settings.public_url, settings.secret_key, image_id,
                                                         content_type, settings.image_url_ttl_s)}
                                | ({"revised_prompt": revised} if revised else {})
                                for image_id, content_type, revised in row.images]
            elif row.task.status == TaskStatus.FAILED:
                line["error"] = {"code": row.task.error_code, "message": row.task.error_message}
            yield json.dumps(line) + "\n"

    return Response(lines(), mimetype="application/jsonl")
