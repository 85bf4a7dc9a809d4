"""POST /v1/images/edits: a multipart form, as the OpenAI SDK's images.edit sends it (`image` for one
file, `image[]` for a list, `mask`, the other parameters as text fields), made into a task like a
generation, its input files stored with it (app.edits, app.stores.inputs)."""

from __future__ import annotations

import io
from typing import Any

from flask import Blueprint, request
from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError
from werkzeug.datastructures import FileStorage, MultiDict

from imagegate.app.edits import EDIT_KEY, IMAGE, MASK, InputFile, describe_inputs, edit_refusal, sniff_image_type
from imagegate.app.schemas import EditRequest, ImagesResponse, TaskAccepted
from imagegate.app.settings import Settings
from imagegate.app.web.auth import require_api_key
from imagegate.app.web.errors import ApiError, from_validation_error
from imagegate.app.web.images import submit_task
from imagegate.app.web.intake import IDEMPOTENCY_HEADER, checked_callback, checked_model, default_callback
from imagegate.app.web.limits import read_form
from imagegate.app.web.operations import Reply, operation
from imagegate.app.web.services import services

bp = Blueprint("image_edits", __name__, url_prefix="/v1/images")
bp.before_request(require_api_key)

IMAGE_FIELDS = ("image", "image[]")  # one file, or several (repeated `image`, or the SDK's `image[]`)
FILE_FIELDS = {*IMAGE_FIELDS, MASK}
MAX_FILENAME = 255


def _form_schema() -> dict[str, Any]:
    """The multipart body: EditRequest's fields, and the files."""
    schema = EditRequest.model_json_schema()
    binary = {"type": "string", "contentMediaType": "application/octet-stream"}
    files = {"type": "array", "items": binary}
    schema["properties"] = {
        "image": files | {"description": "The image(s) to edit: PNG, JPEG or WebP; one part, or one part per image."},
        "image[]": files | {"description": "The images to edit, as the OpenAI SDK sends a list."},
        "mask": binary
        | {"description": "PNG whose transparent areas mark where to edit; the size of the first image."},
        **schema["properties"],
    }
    schema.pop("additionalProperties", None)  # `image` or `image[]`: one of them, which a schema cannot say
    return schema


@bp.post("/edits")
@operation(
    operation_id="createImageEdit",
    summary="Edit or extend images (multipart, as the OpenAI SDK's images.edit sends it; `async: true` for a task)",
    other_bodies={"multipart/form-data": _form_schema()},
    headers=IDEMPOTENCY_HEADER,
    replies={
        200: Reply("The images (OpenAI's shape, plus task_id and task_status)", ImagesResponse),
        202: Reply("Accepted: the task id (async, or the wait ran out)", TaskAccepted),
    },
    errors=(400, 401, 404, 408, 409, 413, 422, 500, 502, 503, 504),
)
def create_edit():
    svc = services()
    if request.mimetype != "multipart/form-data":
        raise ApiError(
            400,
            "This endpoint takes a multipart/form-data body (the images as files, the other parameters as "
            "fields), as the OpenAI SDK's images.edit or `curl -F` send it.",
            param="Content-Type",
            code="unsupported_content_type",
        )
    form, files = read_form(svc.settings.body_timeout_s)
    body = _fields(form, files)
    images, mask = _input_files(files, svc.settings)
    model_name, model = checked_model(svc, body.generation())
    refusal = edit_refusal(model, len(images))
    if refusal is not None:
        param, message = refusal
        raise ApiError(400, message, param=param, code="invalid_value")
    callback_url = checked_callback(svc, body.callback_url) or default_callback()
    return submit_task(
        svc,
        model_name=model_name,
        request=body.stored() | {EDIT_KEY: describe_inputs(images, mask)},
        response_format=body.response_format,
        callback_url=callback_url,
        async_=body.async_,
        inputs=[*images, *([mask] if mask else [])],
    )


def _fields(form: MultiDict, files: MultiDict) -> EditRequest:
    """The text fields, validated; a file where text belongs (or text where a file does) is refused."""
    for name in files:
        if name not in FILE_FIELDS:
            raise ApiError(400, f"'{name}' must be a text field, not a file.", param=name, code="invalid_value")
    values: dict[str, str] = {}
    for name, given in form.lists():
        if name in FILE_FIELDS:
            raise ApiError(400, f"'{name}' must be sent as a file.", param=name, code="invalid_value")
        if len(given) > 1:
            raise ApiError(400, f"'{name}' was given more than once.", param=name, code="invalid_value")
        values[name] = given[0]
    try:
        return EditRequest.model_validate(values)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def _input_files(files: MultiDict, settings: Settings) -> tuple[list[InputFile], InputFile | None]:
    parts = [part for name in IMAGE_FIELDS for part in files.getlist(name)]
    if not parts:
        raise ApiError(400, "Missing required parameter: 'image'.", param="image", code="missing_required_parameter")
    if len(parts) > settings.max_input_images:
        raise ApiError(
            400,
            f"At most {settings.max_input_images} input images are accepted; {len(parts)} were sent.",
            param="image",
            code="too_many_images",
        )
    images = [_input_file(part, IMAGE, index, settings) for index, part in enumerate(parts)]
    masks = files.getlist(MASK)
    if len(masks) > 1:
        raise ApiError(400, "'mask' was given more than once.", param="mask", code="invalid_value")
    mask = _input_file(masks[0], MASK, 0, settings) if masks else None
    if mask is not None:
        if mask.content_type != "image/png":
            raise ApiError(400, "The mask must be a PNG image.", param="mask", code="invalid_image_format")
        if _dimensions(mask) != _dimensions(images[0]):
            width, height = _dimensions(images[0])
            raise ApiError(
                400,
                f"The mask must have the same dimensions as the image ({width}x{height}).",
                param="mask",
                code="invalid_value",
            )
    return images, mask


def _input_file(part: FileStorage, role: str, index: int, settings: Settings) -> InputFile:
    """One file, read up to the limit; its type judged by its own bytes and its header decoded."""
    limit = settings.max_input_image_bytes
    data = part.stream.read(limit + 1)
    name = (part.filename or "")[:MAX_FILENAME] or None
    described = f"'{role}' ({name})" if name else f"'{role}'"
    if len(data) > limit:
        raise ApiError(
            413,
            f"The file {described} is larger than {limit} bytes, the most accepted for one input image.",
            param=role,
            code="image_too_large",
        )
    content_type = sniff_image_type(data)
    if content_type is None:
        raise ApiError(
            400,
            f"The file {described} is not a PNG, JPEG or WebP image.",
            param=role,
            code="invalid_image_format",
        )
    file = InputFile(role, index, content_type, data, name)
    _dimensions(file, described)  # a signature followed by garbage is not an image either
    return file


def _dimensions(file: InputFile, described: str | None = None) -> tuple[int, int]:
    """(width, height) from the image's header (nothing is decoded)."""
    try:
        with Image.open(io.BytesIO(file.data)) as image:
            return image.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise ApiError(
            400,
            f"The file {described or repr(file.role)} could not be read as an image.",
            param=file.role,
            code="invalid_image_format",
        ) from None
