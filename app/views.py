"""The task as clients see it (GET /v1/images/{task_id}, and the data of a webhook event), built
where both processes can: the API answers with it, the workers send it."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import pybase64
from pydantic import BaseModel

from imagegate.app.image_urls import signed_image_url
from imagegate.app.models import Batch
from imagegate.app.schemas import (
    AttemptView,
    BatchCounts,
    BatchView,
    ImageData,
    ImagesResponse,
    TaskError,
    TaskView,
)
from imagegate.app.settings import Settings
from imagegate.app.state.tasks import QueuedReason, TaskStatus
from imagegate.app.stores.tasks import TaskRecord


def timestamp(record: TaskRecord) -> int:
    return int(record.task.created_at.timestamp())


def json_body(model: BaseModel) -> str:
    """A reply's JSON, written by pydantic itself: through a dict and the json module, a reply's
    200 KB base64 string cost a tenth of a synchronous request's API CPU."""
    return model.model_dump_json(exclude_none=True)


def images_reply(
    task_id: uuid.UUID, created_at: datetime, usage: dict[str, Any] | None, data: list[ImageData]
) -> ImagesResponse:
    """A succeeded task's synchronous reply: the API's from the stored task, and the one a worker
    hands over with the images still in hand (app/wakeups.py)."""
    return ImagesResponse(
        created=int(created_at.timestamp()),
        data=data,
        usage=usage,
        task_id=str(task_id),
        task_status=TaskStatus.SUCCEED,
    )


def b64_reply_body(
    task_id: uuid.UUID, created_at: datetime, usage: dict[str, Any] | None, images: Sequence[tuple[bytes, str | None]]
) -> bytes:
    """The JSON of a succeeded b64_json task's reply: `images_reply` of the images (bytes, revised
    prompt), with each image's base64 put in place after the JSON is written. Base 64 never needs
    escaping, and the JSON writer's scan of a 200 KB string for characters to escape was most of
    the reply's cost."""
    items = [ImageData(b64_json="", revised_prompt=prompt) for _, prompt in images]
    body = json_body(images_reply(task_id, created_at, usage, items)).encode()
    # The data come before the usage (an upstream's usage might hold such a key): the first
    # len(images) empty b64_json values are the images', in order.
    head, *rest = body.split(b'"b64_json":""', len(images))
    spliced = [head]
    for (data, _), after in zip(images, rest, strict=True):
        spliced += [b'"b64_json":"', pybase64.b64encode(data), b'"', after]
    return b"".join(spliced)


def image_items(record: TaskRecord, settings: Settings, *, as_urls: bool = False) -> list[ImageData]:
    """The images in the task's response_format, or as URLs when asked (webhooks never carry base64)."""
    if record.task.response_format == "b64_json" and not as_urls:
        return [
            ImageData(b64_json=pybase64.b64encode(image.data or b"").decode(), revised_prompt=image.revised_prompt)
            for image in record.images
        ]
    return [
        ImageData(
            url=image.store_url  # the bucket's presigned URL, with IMAGEGATE_IMAGE_URLS=store
            or signed_image_url(
                settings.public_url, settings.secret_key, image.id, image.content_type, settings.image_url_ttl_s
            ),
            revised_prompt=image.revised_prompt,
        )
        for image in record.images
    ]


def task_view(record: TaskRecord, settings: Settings, *, as_urls: bool = False) -> TaskView:
    task = record.task
    view = TaskView(
        model=task.model,
        task_id=str(task.id),
        task_status=task.status,
        created=timestamp(record),
        attempts=task.attempts,
        attempt_log=[
            AttemptView(
                number=a.number,
                slot=a.slot,
                model=a.model,
                started_at=a.started_at,
                ended_at=a.ended_at,
                upstream_status=a.upstream_status,
                error_code=a.error_code,
            )
            for a in record.attempts
        ],
    )
    if task.deleted:
        view = view.model_copy(update={"deleted": True})
    expired = {"expired": True} if task.images_expired_at is not None else {}
    if task.status == TaskStatus.SUCCEED:
        gone = expired or task.deleted  # a delete interrupted before its images went shows none either
        data = [] if gone else image_items(record, settings, as_urls=as_urls)
        return view.model_copy(update={"data": data, "usage": task.usage, **expired})
    if task.status == TaskStatus.FAILED:
        return view.model_copy(
            update={
                **expired,
                "error": TaskError(
                    code=task.error_code or "internal_error",
                    message=task.error_message or "",
                    details=task.error_details,
                ),
            }
        )
    if task.cancel_requested:
        return view.model_copy(update={"cancel_requested": True})
    if task.status == TaskStatus.PENDING and task.queued_reason:
        return view.model_copy(update={"queued_reason": QueuedReason(task.queued_reason)})
    return view


def batch_view(batch: Batch, counts: dict[str, int]) -> BatchView:
    return BatchView(
        id=str(batch.id),
        status=batch.status,
        created=int(batch.created_at.timestamp()),
        finished=int(batch.finished_at.timestamp()) if batch.finished_at else None,
        total=batch.total,
        counts=BatchCounts(**counts),
        metadata=batch.meta,
        callback_url=batch.callback_url,
    )
