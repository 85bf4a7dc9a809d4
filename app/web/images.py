"""/v1/images: submit a generation (async or waiting for it) and read a task."""

from __future__ import annotations

import base64
import logging
import time
import uuid

from flask import Blueprint, g, request
from pydantic import ValidationError

from app.families import RequestRefused, check_request
from app.events import announce_quietly
from app.queue import publish_run
from app.schemas import AttemptView, GenerationRequest, ImageData, ImagesResponse, TaskAccepted, TaskError, TaskView
from app.signing import signed_image_url
from app.states import TaskStatus, http_status_of_failure
from app.store import CancelResult, TaskRecord, parse_task_id
from app.web.auth import require_api_key
from app.web.errors import ApiError, error_response, from_validation_error
from app.web.services import Services, services

log = logging.getLogger(__name__)

bp = Blueprint("images", __name__, url_prefix="/v1/images")
bp.before_request(require_api_key)


def _json(model, status: int = 200):
    return model.model_dump(mode="json", exclude_none=True), status


def _timestamp(record: TaskRecord) -> int:
    return int(record.task.created_at.timestamp())


def _image_items(record: TaskRecord, svc: Services) -> list[ImageData]:
    settings = svc.settings
    if record.task.response_format == "b64_json":
        return [ImageData(b64_json=base64.b64encode(image.data or b"").decode(), revised_prompt=image.revised_prompt)
                for image in record.images]
    return [ImageData(url=signed_image_url(settings.public_url, settings.secret_key, image.id, image.content_type,
                                           settings.image_url_ttl_s),
                      revised_prompt=image.revised_prompt)
            for image in record.images]


def _parse_generation() -> GenerationRequest:
    raw = request.get_data(cache=False)  # raises 413 past IMAGEGATE_MAX_BODY_BYTES
    if not raw.strip():
        raise ApiError(400, "The request body is empty; send a JSON object.", code="invalid_json")
    try:
        return GenerationRequest.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def _publish(svc: Services, task_id: uuid.UUID) -> None:
    try:
        publish_run(svc.celery, task_id, attempt=1)
    except Exception:  # the task is committed pending; a broker outage must not lose the reply
        log.exception("could not publish task %s; it stays pending", task_id)


@bp.post("/generations")
@bp.post("/generations/")
def create_generation():
    svc = services()
    body = _parse_generation()
    model_name = body.model or svc.default_model
    model = svc.models.get(model_name)
    if model is None:
        raise ApiError(404, f"The model '{model_name}' does not exist.", param="model", code="model_not_found")
    try:  # refuse what the model's family cannot do before anything is stored or queued
        check_request(body, model)
    except RequestRefused as exc:
        raise ApiError(400, exc.message, param=exc.param, code="invalid_value") from None

    task = svc.store.create(api_key_id=g.api_key_id, model=model_name, request=body.stored(),
                            response_format=body.response_format)
    if body.async_:
        _publish(svc, task.id)
        return _json(TaskAccepted(created=int(task.created_at.timestamp()), task_id=str(task.id),
                                  task_status=TaskStatus.PENDING), 202)

    # Subscribe before publishing, so the end of even a very fast task is not missed.
    with svc.events.subscription(str(task.id)) as wakeup:
        _publish(svc, task.id)
        record = _wait_for_end(svc, task.id, wakeup)
    return _sync_reply(svc, record)


def _wait_for_end(svc: Services, task_id: uuid.UUID, wakeup) -> TaskRecord:
    deadline = time.monotonic() + svc.settings.sync_timeout_s
    with_bytes = True
    while True:
        remaining = deadline - time.monotonic()
        if remaining > 0:
            wakeup.wait(remaining)
        record = svc.store.get(task_id, with_bytes=with_bytes)
        if record.task.status in (TaskStatus.SUCCEED, TaskStatus.FAILED) or time.monotonic() >= deadline:
            return record


def _sync_reply(svc: Services, record: TaskRecord):
    task = record.task
    if task.status == TaskStatus.SUCCEED:
        return _json(ImagesResponse(created=_timestamp(record), data=_image_items(record, svc), usage=task.usage,
                                    task_id=str(task.id), task_status=TaskStatus.SUCCEED))
    if task.status == TaskStatus.FAILED:
        status = http_status_of_failure(task.error_code)
        return error_response(status, task.error_message or "The image task failed.",
                              type="invalid_request_error" if status == 400 else "upstream_error",
                              code=task.error_code, task_id=str(task.id), task_status=task.status)
    # Still going past IMAGEGATE_SYNC_TIMEOUT_S: hand back the id; the task carries on.
    return _json(TaskAccepted(created=_timestamp(record), task_id=str(task.id), task_status=task.status), 202)


def _owned_record(task_id: str) -> TaskRecord:
    svc = services()
    parsed = parse_task_id(task_id)
    record = svc.store.get(parsed, api_key_id=g.api_key_id, with_bytes=True) if parsed else None
    if record is None:  # missing, malformed and another key's: one answer, nothing to tell them apart
        raise ApiError(404, f"No task found with id '{task_id}'.", param="task_id", code="task_not_found")
    return record


@bp.get("/<task_id>")
def get_task(task_id: str):
    return _json(_task_view(_owned_record(task_id), services()))


@bp.post("/<task_id>/cancel")
def cancel_task(task_id: str):
    """A pending task fails `cancelled` at once; a running one stops before its next upstream call
    and before storing anything; a finished one answers 409."""
    svc = services()
    parsed = parse_task_id(task_id)
    result = svc.store.cancel(parsed, g.api_key_id) if parsed else CancelResult.MISSING
    if result == CancelResult.FINISHED:
        raise ApiError(409, "The task has already ended; there is nothing to cancel.", param="task_id",
                       code="task_finished")
    record = _owned_record(task_id)  # 404 for MISSING, in the same words as GET
    if result == CancelResult.CANCELLED:
        announce_quietly(svc.events, record.task.id)  # wake a synchronous request waiting on it
    return _json(_task_view(record, svc), 200 if record.task.status == TaskStatus.FAILED else 202)


def _task_view(record: TaskRecord, svc: Services) -> TaskView:
    task = record.task
    view = TaskView(model=task.model, task_id=str(task.id), task_status=task.status, created=_timestamp(record),
                    attempts=task.attempts,
                    attempt_log=[AttemptView(number=a.number, slot=a.slot, model=a.model, started_at=a.started_at,
                                             ended_at=a.ended_at, upstream_status=a.upstream_status,
                                             error_code=a.error_code) for a in record.attempts])
    if task.status == TaskStatus.SUCCEED:
        view = view.model_copy(update={"data": _image_items(record, svc), "usage": task.usage})
    elif task.status == TaskStatus.FAILED:
        view = view.model_copy(update={"error": TaskError(code=task.error_code or "internal_error",
                                                          message=task.error_message or "",
                                                          details=task.error_details)})
    elif task.cancel_requested:
        view = view.model_copy(update={"cancel_requested": True})
    return view
