"""/v1/images/batches: many generation requests at once, as JSON or as OpenAI Batch-style JSONL."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, g, request
from pydantic import ValidationError
from pydantic_core import from_json

from imagegate.app.ids import parse_id
from imagegate.app.image_urls import signed_image_url
from imagegate.app.logs import bind_contextvars
from imagegate.app.schemas import BatchCreate, BatchLine, BatchView
from imagegate.app.state.tasks import TaskStatus
from imagegate.app.stores.batches import NewLine
from imagegate.app.views import batch_view
from imagegate.app.web.auth import require_api_key
from imagegate.app.web.errors import ApiError, from_error_details, from_validation_error
from imagegate.app.web.intake import (
    IDEMPOTENCY_HEADER,
    checked_callback,
    checked_model,
    default_callback,
    idempotency,
)
from imagegate.app.web.key_limits import admission
from imagegate.app.web.limits import read_body
from imagegate.app.web.operations import Reply, operation
from imagegate.app.web.services import Services, services

log = logging.getLogger(__name__)

bp = Blueprint("batches", __name__, url_prefix="/v1/images/batches")
bp.before_request(require_api_key)


@bp.before_request
def _batch_body_limit() -> None:
    # A batch body is thousands of requests: it has a limit of its own (IMAGEGATE_MAX_BATCH_BYTES).
    request.max_content_length = services().settings.max_batch_bytes


MAX_REPORTED_ERRORS = 1000
JSONL_BODY = {"type": "string", "description": "JSONL: one BatchLine object per line."}


@dataclass(frozen=True)
class _Line:
    """One line as sent: what it validated to, or why it did not."""

    number: int
    document: Any
    validated: BatchLine | ApiError

    @property
    def custom_id(self) -> str | None:  # as sent, to name a bad line
        custom_id = self.document.get("custom_id") if isinstance(self.document, dict) else None
        return custom_id if isinstance(custom_id, str) else None


def _validated(document: Any) -> BatchLine | ApiError:
    try:
        return BatchLine.model_validate(document, strict=True)
    except ValidationError as exc:
        return from_validation_error(exc)


def _check_count(svc: Services, count: int) -> None:
    if not count:
        raise ApiError(400, "The batch has no requests.", param="requests", code="empty_batch")
    if count > svc.settings.max_batch:
        raise ApiError(
            400,
            f"A batch takes at most {svc.settings.max_batch} requests; this one has {count}.",
            param="requests",
            code="batch_too_large",
        )


def _json_lines(svc: Services, document: dict[str, Any]) -> list[_Line]:
    """A JSON body, validated as BatchCreate: a fault outside `requests` refuses it at once."""
    if isinstance(document["requests"], list):
        _check_count(svc, len(document["requests"]))
    try:
        batch = BatchCreate.model_validate(document, strict=True)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            if error["loc"][:1] != ("requests",) or len(error["loc"]) < 2:
                raise from_error_details(error) from None
        # Only lines are at fault: validate each alone, to name every bad one.
        return [_Line(number, line, _validated(line)) for number, line in enumerate(document["requests"], 1)]
    return [
        _Line(number, line, validated)
        for number, (line, validated) in enumerate(zip(document["requests"], batch.requests, strict=True), 1)
    ]


def _jsonl_lines(svc: Services, raw: bytes) -> list[_Line]:
    """One {"custom_id", "body"} per line, as OpenAI's Batch API input."""
    # Split on "\n" only: str.splitlines() would also cut at U+2028 inside a JSON string.
    texts = [(number, text) for number, text in enumerate(raw.split(b"\n"), 1) if text.strip()]
    _check_count(svc, len(texts))
    lines = []
    for number, text in texts:
        try:
            document = from_json(text, allow_inf_nan=False)
        except ValueError:  # not JSON, or nested too deep
            lines.append(_Line(number, None, ApiError(400, "not valid JSON", code="invalid_json")))
        else:
            lines.append(_Line(number, document, _validated(document)))
    return lines


def _submitted(svc: Services) -> tuple[list[_Line], dict[str, Any]]:
    """The lines, and the batch's options (callback_url, metadata) when the body is JSON."""
    raw = read_body(svc.settings.body_timeout_s)
    try:
        document = from_json(raw, allow_inf_nan=False)  # bounded nesting, unlike json.loads
    except ValueError:
        document = None
    if isinstance(document, dict) and "requests" in document:
        return _json_lines(svc, document), {name: document.get(name) for name in ("callback_url", "metadata")}
    return _jsonl_lines(svc, raw), {}


def _checked_lines(svc: Services, lines: list[_Line]) -> list[NewLine]:
    """Every line checked; any bad line refuses the whole batch, naming each bad line."""
    accepted, errors, seen = [], [], set()
    for line in lines:
        try:
            if isinstance(line.validated, ApiError):
                raise line.validated
            valid = line.validated
            if valid.custom_id in seen:
                raise ApiError(
                    400,
                    f"custom_id {valid.custom_id!r} is used by an earlier line",
                    param="custom_id",
                    code="duplicate_custom_id",
                )
            seen.add(valid.custom_id)
            model_name, _ = checked_model(svc, valid.body, prefix="body.")
            callback = checked_callback(svc, valid.body.callback_url, param="body.callback_url")
            accepted.append(NewLine(valid.custom_id, model_name, valid.body, callback))
        except ApiError as exc:
            if len(errors) < MAX_REPORTED_ERRORS:
                errors.append(
                    {"line": line.number, "custom_id": line.custom_id, "param": exc.param, "message": exc.message}
                )
    if errors:
        raise ApiError(
            400,
            f"{len(errors)} line(s) of the batch are invalid; nothing was accepted.",
            param="requests",
            code="invalid_batch",
            extra={"lines": errors},
        )
    return accepted


def _publish_in_background(svc: Services, task_ids: list[uuid.UUID], batch_id: uuid.UUID) -> None:
    """Answer at once; a batch's thousands of messages go out after, in pipelined chunks, yielding to
    other requests between chunks (under gevent this thread is a greenlet). Whatever this misses (a
    crash half-way), the sweeper republishes: the tasks are committed pending."""

    def publish() -> None:
        try:
            svc.runs.publish_all(task_ids, batch_id=batch_id, between_chunks=lambda: time.sleep(0))
        except Exception:
            log.exception("could not publish batch %s; the sweeper will", batch_id)

    threading.Thread(target=publish, name=f"publish-{batch_id}", daemon=True).start()


@bp.post("")
@bp.post("/")
@operation(
    operation_id="createImageBatch",
    summary="Submit many generation requests (JSON, or JSONL lines of {custom_id, body})",
    body=BatchCreate,
    other_bodies={"application/jsonl": JSONL_BODY},
    headers=IDEMPOTENCY_HEADER,
    replies={202: Reply("Accepted", BatchView)},
    errors=(400, 401, 404, 408, 413, 422, 429, 503),
)
def create_batch():
    svc = services()
    submitted, options = _submitted(svc)
    metadata = options.get("metadata")
    callback_url = checked_callback(svc, options.get("callback_url")) or default_callback()
    lines = _checked_lines(svc, submitted)
    fingerprinted = {
        "requests": [{"custom_id": line.custom_id, "body": line.body.stored()} for line in lines],
        "callback_url": options.get("callback_url"),
        "metadata": metadata,
    }
    batch, task_ids = svc.batches.create(
        api_key_id=g.api_key_id,
        lines=lines,
        callback_url=callback_url,
        metadata=metadata,
        idempotency=idempotency(fingerprinted),
        admit=admission(requests=len(lines), images=sum(line.body.n for line in lines), param="requests"),
    )
    bind_contextvars(batch_id=str(batch.id))
    if task_ids:
        log.info("batch accepted with %d tasks", len(task_ids))
        _publish_in_background(svc, task_ids, batch.id)
    counts = {TaskStatus.PENDING: len(task_ids)} if task_ids else svc.batches.get(batch.id, g.api_key_id)[1]
    headers = {} if task_ids else {"Idempotent-Replayed": "true"}
    return batch_view(batch, counts).model_dump(mode="json"), 202, headers


def _owned(batch_id: str):
    parsed = parse_id(batch_id)
    found = services().batches.get(parsed, g.api_key_id) if parsed else None
    if found is None:
        raise ApiError(404, f"No batch found with id '{batch_id}'.", param="batch_id", code="batch_not_found")
    return found


@bp.get("/<batch_id>")
@operation(
    operation_id="getImageBatch",
    summary="A batch and its counts",
    replies={200: Reply("The batch", BatchView)},
    errors=(401, 404, 503),
)
def get_batch(batch_id: str):
    return batch_view(*_owned(batch_id)).model_dump(mode="json")


@bp.post("/<batch_id>/cancel")
@operation(
    operation_id="cancelImageBatch",
    summary="Cancel every task of the batch not yet ended",
    replies={200: Reply("The batch", BatchView)},
    errors=(401, 404, 503),
)
def cancel_batch(batch_id: str):
    svc = services()
    batch, _ = _owned(batch_id)
    svc.batches.cancel(batch.id, g.api_key_id)
    svc.after_end.batch_touched(batch.id)  # closes it now if nothing was running
    return batch_view(*_owned(batch_id)).model_dump(mode="json")


@bp.get("/<batch_id>/results")
@operation(
    operation_id="getImageBatchResults",
    summary="One JSONL line per request, in line order",
    replies={
        200: Reply(
            "JSONL",
            media_type="application/jsonl",
            schema={"type": "string", "description": "One result object per line."},
        )
    },
    errors=(401, 404, 503),
)
def batch_results(batch_id: str):
    """JSONL, one line per request in the order of the batch's lines, streamed page by page."""
    svc = services()
    batch, _ = _owned(batch_id)
    settings = svc.settings

    def lines():
        for row in svc.batches.results(batch.id):
            line: dict[str, Any] = {
                "custom_id": row.custom_id,
                "task_id": str(row.task.id),
                "task_status": row.task.status,
            }
            if row.task.status == TaskStatus.SUCCEED:
                line["data"] = [
                    {
                        "url": signed_image_url(
                            settings.public_url, settings.secret_key, image_id, content_type, settings.image_url_ttl_s
                        )
                    }
                    | ({"revised_prompt": revised} if revised else {})
                    for image_id, content_type, revised in row.images
                ]
            elif row.task.status == TaskStatus.FAILED:
                line["error"] = {"code": row.task.error_code, "message": row.task.error_message}
            yield json.dumps(line) + "\n"

    return Response(lines(), mimetype="application/jsonl")
