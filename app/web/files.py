"""Stored images behind signed, expiring URLs (no Authorization header needed)."""

from __future__ import annotations

from flask import Blueprint, Response, request

from imagegate.app.ids import parse_id
from imagegate.app.image_urls import verify
from imagegate.app.web.errors import ApiError
from imagegate.app.web.operations import Reply, operation
from imagegate.app.web.services import services

bp = Blueprint("files", __name__, url_prefix="/files")


@bp.get("/images/<image_file>")
@operation(
    operation_id="getImageFile",
    summary="A stored image, by the signed URL a task gave (no API key)",
    public=True,
    replies={200: Reply("The image", media_type="image/*", schema={"type": "string", "contentMediaType": "image/*"})},
    errors=(404, 503),
)
def image(image_file: str):
    svc = services()
    image_id = parse_id(image_file.rsplit(".", 1)[0])
    valid = image_id is not None and verify(
        svc.settings.secret_key, image_id, request.args.get("expires", ""), request.args.get("signature", "")
    )
    found = svc.tasks.image(image_id) if valid else None
    if found is None:
        raise ApiError(
            404,
            "This image URL is invalid or has expired; fetch the task again for a fresh one.",
            code="image_not_found",
        )
    content_type, data = found
    return Response(
        data,
        content_type=content_type,
        headers={"Cache-Control": "private, max-age=3600", "Content-Length": str(len(data))},
    )
