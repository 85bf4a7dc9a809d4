"""/v1/images: submit a generation (async or waiting for it) and read a task."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence

from flask import Blueprint, current_app, g, request
from pydantic import ValidationError
from werkzeug.routing import BaseConverter

from imagegate.app.edits import InputFile
from imagegate.app.failures import http_status_of_failure
from imagegate.app.ids import parse_id
from imagegate.app.logs import bind_contextvars
from imagegate.app.metrics import metrics
from imagegate.app.schemas import GenerationRequest, ImagesResponse, TaskAccepted, TaskView
from imagegate.app.state.refused import Refused
from imagegate.app.state.tasks import ENDED, CancelOutcome, TaskStatus
from imagegate.app.stores.tasks import NewTask, TaskRecord
from imagegate.app.views import b64_reply_body, image_items, images_reply, json_body, task_view, timestamp
from imagegate.app.web.auth import require_api_key
from imagegate.app.web.errors import ApiError, error_response, from_validation_error
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

bp = Blueprint("images", __name__, url_prefix="/v1/images")
bp.before_request(require_api_key)


class TaskIdConverter(BaseConverter):
    """A task id: any path segment but the names of its sibling routes, so that GET
    /v1/images/generations is a 405 naming POST (and OPTIONS lists only POST), not a task lookup."""

    regex = r"(?!(?:generations|edits|variations|batches)$)[^/]+"


bp.record_once(lambda state: state.app.url_map.converters.setdefault("task_id", TaskIdConverter))


def _json(model, status: int = 200):
    return _body(json_body(model), status)


def _body(body: str | bytes, status: int = 200):
    return current_app.response_class(body, mimetype="application/json"), status


def _parse_generation(svc: Services) -> GenerationRequest:
    # Any other content type is read as JSON (curl -d sends a form type), but a multipart form
    # (the OpenAI SDK's edits, a file upload) never is.
    if request.mimetype == "multipart/form-data":
        raise ApiError(
            400,
            "This endpoint takes a JSON body: send the request as JSON with 'Content-Type: application/json', "
            "not as multipart/form-data.",
            param="Content-Type",
            code="unsupported_content_type",
        )
    raw = read_body(svc.settings.body_timeout_s)  # raises 413 past IMAGEGATE_MAX_BODY_BYTES
    if not raw.strip():
        raise ApiError(400, "The request body is empty; send a JSON object.", code="invalid_json")
    try:
        return GenerationRequest.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def _publish(svc: Services, task_id: uuid.UUID, *, awaited: bool = False) -> None:
    try:
        svc.runs.publish(task_id, awaited=awaited)
    except Exception:  # the task is committed pending; a broker outage must not lose the reply
        log.exception("could not publish task %s; it stays pending", task_id)


@bp.post("/generations")
@bp.post("/generations/")
@operation(
    operation_id="createImage",
    summary="Generate images (synchronously, or as a task with `async: true`)",
    body=GenerationRequest,
    headers=IDEMPOTENCY_HEADER,
    replies={
        200: Reply("The images (OpenAI's shape, plus task_id and task_status)", ImagesResponse),
        202: Reply("Accepted: the task id (async, or the wait ran out)", TaskAccepted),
    },
    errors=(400, 401, 404, 408, 409, 413, 422, 429, 500, 502, 503, 504),
)
def create_generation():
    svc = services()
    body = _parse_generation(svc)
    model_name, _ = checked_model(svc, body)
    callback_url = checked_callback(svc, body.callback_url) or default_callback()
    return submit_task(
        svc,
        model_name=model_name,
        request=body.stored(),
        response_format=body.response_format,
        callback_url=callback_url,
        async_=body.async_,
    )


def submit_task(
    svc: Services,
    *,
    model_name: str,
    request: dict,
    response_format: str,
    callback_url: str | None,
    async_: bool,
    inputs: Sequence[InputFile] = (),
):
    """Store the checked request as a task (with an edit's input files), publish it, and answer: 202
    at once when async, else the images once it ended (or 202 when the wait ran out)."""
    replay_key = idempotency(request)
    admit = admission(requests=1, images=request.get("n", 1), param="n")
    if async_ and replay_key is None and admit is None and not inputs:  # stored and published in groups
        task = svc.async_submits.submit(
            api_key_id=g.api_key_id,
            model=model_name,
            request=request,
            response_format=response_format,
            callback_url=callback_url,
        )
        bind_contextvars(task_id=str(task.id), model=model_name)
        log.info("task accepted")
        return _json(_accepted(task), 202)
    task, new = svc.tasks.create(
        api_key_id=g.api_key_id,
        model=model_name,
        request=request,
        response_format=response_format,
        callback_url=callback_url,
        idempotency=replay_key,
        inputs=inputs,
        admit=admit,
    )
    replayed = {} if new else {"Idempotent-Replayed": "true"}
    bind_contextvars(task_id=str(task.id), model=model_name)
    log.info("task accepted" if new else "task replayed for its Idempotency-Key")
    if async_:
        if new:
            _publish(svc, task.id)
        return *_json(_accepted(task), 202), replayed

    # Subscribe before publishing, so the end of even a very fast task is not missed. A new b64_json
    # task asks its worker to hand its reply over (app/wakeups.py): its images are not read back. Only
    # such a task is asked: a url reply holds no bytes to save, and the worker makes a b64_json reply.
    awaited = new and response_format == "b64_json"
    with svc.wakeups.subscription(str(task.id)) as wakeup:
        if new:
            _publish(svc, task.id, awaited=awaited)
        ended = _wait_for_end(svc, task.id, wakeup, ended_maybe=not new, awaited=awaited)
    if isinstance(ended, bytes):
        metrics().sync_replies.labels("handed_over").inc()
        return *_body(ended), replayed
    if ended.task.status == TaskStatus.SUCCEED:
        metrics().sync_replies.labels("database").inc()
    response = _sync_reply(svc, ended)
    return (*response, replayed) if isinstance(response, tuple) else (response, replayed)


def _accepted(task: NewTask) -> TaskAccepted:
    return TaskAccepted(created=int(task.created_at.timestamp()), task_id=str(task.id), task_status=TaskStatus.PENDING)


# Besides the pub/sub wake-up, a waiting request re-reads its task's status after this long, then
# 1.5 times longer each time: a lost announcement (Redis dropped it, the worker could not send it)
# delays a reply by seconds, never until the sync timeout.
FALLBACK_FIRST_S, FALLBACK_MAX_S = 2.0, 10.0


def _wait_for_end(
    svc: Services, task_id: uuid.UUID, wakeup, *, ended_maybe: bool, awaited: bool = False
) -> TaskRecord | bytes:
    """The task once ended (or as it is at IMAGEGATE_SYNC_TIMEOUT_S), or the reply its worker
    handed over when `awaited`. A replayed task may have ended long ago: read it first. After a
    wake-up read it whole at once (one session, no attempt log); a fallback re-read reads the
    status alone."""
    deadline = time.monotonic() + svc.settings.sync_timeout_s
    if ended_maybe and svc.tasks.status(task_id) in ENDED:
        return _ended_record(svc, task_id)
    fallback = FALLBACK_FIRST_S
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return _ended_record(svc, task_id)
        if wakeup.wait(min(remaining, fallback)):
            if awaited and (reply := svc.wakeups.take_reply(str(task_id))) is not None:
                return reply
            record = _ended_record(svc, task_id)
            if record.task.status in ENDED:
                return record
        elif svc.tasks.status(task_id) in ENDED:
            return _ended_record(svc, task_id)
        else:
            fallback = min(fallback * 1.5, FALLBACK_MAX_S)


def _ended_record(svc: Services, task_id: uuid.UUID) -> TaskRecord:
    record = svc.tasks.get(task_id, with_bytes=True, with_attempts=False)
    assert record is not None  # tasks are never deleted while a request waits on them
    return record


def _sync_reply(svc: Services, record: TaskRecord):
    task = record.task
    if task.status == TaskStatus.SUCCEED:
        if task.response_format == "b64_json":
            images = [(image.data or b"", image.revised_prompt) for image in record.images]
            return _body(b64_reply_body(task.id, task.created_at, task.usage, images))
        return _json(images_reply(task.id, task.created_at, task.usage, image_items(record, svc.settings)))
    if task.status == TaskStatus.FAILED:
        status = http_status_of_failure(task.error_code)
        return error_response(
            status,
            task.error_message or "The image task failed.",
            type="invalid_request_error" if status == 400 else "upstream_error",
            code=task.error_code,
            task_id=str(task.id),
            task_status=task.status,
        )
    # Still going past IMAGEGATE_SYNC_TIMEOUT_S: hand back the id; the task carries on.
    return _json(TaskAccepted(created=timestamp(record), task_id=str(task.id), task_status=task.status), 202)


def _owned_record(task_id: str) -> TaskRecord:
    svc = services()
    parsed = parse_id(task_id)
    record = svc.tasks.get(parsed, api_key_id=g.api_key_id, with_bytes=True) if parsed else None
    if record is None:  # missing, malformed and another key's: one answer, nothing to tell them apart
        raise ApiError(404, f"No task found with id '{task_id}'.", param="task_id", code="task_not_found")
    return record


@bp.get("/<task_id:task_id>")
@operation(
    operation_id="getImageTask",
    summary="A task's status, and its images once it succeeded",
    replies={200: Reply("The task", TaskView)},
    errors=(401, 404, 503),
)
def get_task(task_id: str):
    return _json(task_view(_owned_record(task_id), services().settings))


@bp.post("/<task_id:task_id>/cancel")
@operation(
    operation_id="cancelImageTask",
    summary="Cancel a task: a pending one ends at once, a running one before its next upstream call",
    replies={
        200: Reply("Cancelled (failed with error code cancelled)", TaskView),
        202: Reply("Running: it stops before its next upstream call or store", TaskView),
    },
    errors=(401, 404, 409, 503),
)
def cancel_task(task_id: str):
    """A pending task fails `cancelled` at once; a running one stops before its next upstream call
    and before storing anything; a finished one answers 409."""
    svc = services()
    parsed = parse_id(task_id)
    result = svc.tasks.cancel(parsed, g.api_key_id) if parsed else Refused.NOT_FOUND
    if result is Refused.ALREADY_ENDED:
        raise ApiError(
            409, "The task has already ended; there is nothing to cancel.", param="task_id", code="task_finished"
        )
    record = _owned_record(task_id)  # 404 for NOT_FOUND and NOT_OWNER, in the same words as GET
    if result is CancelOutcome.ENDED:  # wake waiters, send its webhook, maybe close its batch
        svc.after_end.task_ended(
            record.task.id, record.task.batch_id, has_callback=record.task.callback_url is not None
        )
    return _json(task_view(record, svc.settings), 200 if record.task.status == TaskStatus.FAILED else 202)


# 400, not 501: clients (the OpenAI SDKs among them) retry a 5xx, which here can only fail again.
@bp.post("/variations")
@operation(
    operation_id="createImageVariation",
    summary="Not supported yet: image variations (answers 400 `unsupported_endpoint`)",
    replies={},
    errors=(400, 401),
)
def create_variation():
    raise _not_supported("Image variations (POST /v1/images/variations)")


def _not_supported(what: str) -> ApiError:
    return ApiError(
        400,
        f"{what} are not supported yet by this gateway. Use POST /v1/images/edits to edit images.",
        code="unsupported_endpoint",
    )
