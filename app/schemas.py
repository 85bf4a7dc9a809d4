"""Request and response shapes. The same models validate requests and generate /openapi.json."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_serializer
from pydantic_core import PydanticCustomError

from imagegate.app.state.batches import BatchStatus
from imagegate.app.state.tasks import QueuedReason, TaskStatus

MAX_PROMPT_CHARS = 32000  # gpt-image's limit, the largest of any model family
MAX_N = 10
SIZE_PATTERN = r"^(auto|[1-9][0-9]{1,4}x[1-9][0-9]{1,4}|[1-9][kK])$"


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(key) or _has_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_has_nul(item) for item in value)
    return False  # numbers, booleans, None, and nested models (they check their own fields)


class RequestModel(BaseModel):
    """A client's input. Postgres stores no NUL character in text or jsonb: refuse it at validation,
    in any string of any field, nested ones (extra_body, metadata) and object keys included."""

    @field_validator("*")
    @classmethod
    def _no_nul_character(cls, value: Any) -> Any:
        if _has_nul(value):
            raise PydanticCustomError("nul_character", "must not contain the NUL character (\\u0000)")
        return value


class ImageRequest(RequestModel):
    """What a generation and an edit share: the model, a prompt that is not blank, no unknown field."""

    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, frozen=True, json_schema_extra={"additionalProperties": False}
    )

    model: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="Model to use; defaults to the first model of the providers file.",
    )

    @field_validator("prompt", check_fields=False)  # each request declares its own prompt
    @classmethod
    def _prompt_not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("prompt must not be empty")
        return prompt

    def stored(self) -> dict[str, Any]:
        """The request as kept on the task: the fields the client sent, under the client's names (an
        edit's files are described beside them)."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


class GenerationRequest(ImageRequest):
    """POST /v1/images/generations: OpenAI's Images fields plus GeekAI's extensions."""

    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS, description="Text description of the image(s).")
    n: int = Field(1, ge=1, le=MAX_N, description="How many images to generate.")
    size: str | None = Field(None, pattern=SIZE_PATTERN, description="WIDTHxHEIGHT, `auto`, or 1k/2k/4k.")
    quality: str | None = Field(None, max_length=32)
    style: str | None = Field(None, max_length=32)
    response_format: Literal["url", "b64_json"] = "url"
    output_format: Literal["png", "jpeg", "jpg", "webp"] = "png"
    output_compression: int | None = Field(None, ge=0, le=100)
    background: Literal["transparent", "opaque", "auto"] | None = None
    moderation: Literal["low", "auto"] | None = None
    user: str | None = Field(None, max_length=256)
    stream: Literal[False] | None = Field(None, description="Streaming is not supported; omit or false.")
    partial_images: Literal[0] | None = None

    # GeekAI extensions
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    aspect_ratio: str | None = Field(None, pattern=r"^(auto|[0-9]+(\.[0-9]+)?:[0-9]+(\.[0-9]+)?)$")
    image: str | list[str] | None = Field(None, description="Input image(s): URL or base64.")
    strength: float | None = Field(None, ge=0, le=1)
    mask: str | None = None
    style_preset: str | None = Field(None, max_length=64)
    resolution: str | None = Field(None, max_length=16, description="Relay-specific resolution, e.g. 1k or 2k.")
    watermark: bool | None = None
    extra_body: dict[str, Any] | None = Field(None, description="Provider-specific parameters, forwarded as is.")
    callback_url: str | None = Field(
        None, max_length=2048, pattern=r"^https?://", description="Where the task's end is POSTed (Standard Webhooks)."
    )
    async_: bool = Field(False, alias="async", description="Answer 202 with a task id at once.")
    retries: int = Field(0, ge=0, le=10, description="Automatic retries on retryable upstream errors.")

    @field_validator("stream", "partial_images", mode="before")
    @classmethod
    def _exact_literal(cls, value: Any, info: ValidationInfo) -> Any:
        # A Literal takes what compares equal to it: 0 for False; False and 0.0 for 0.
        expected = bool if info.field_name == "stream" else int
        if value is not None and type(value) is not expected:
            raise PydanticCustomError(
                "literal_error", "Input should be {expected}", {"expected": "false" if expected is bool else "0"}
            )
        return value

    @property
    def image_format(self) -> str:
        return "jpeg" if self.output_format == "jpg" else self.output_format

    def upstream_params(self) -> dict[str, Any]:
        """The fields the client sent that an upstream may see: all but the gateway's own controls."""
        return self.model_dump(
            mode="json",
            exclude_unset=True,
            exclude_none=True,
            exclude={"async_", "retries", "stream", "partial_images", "callback_url"},
        )


class EditRequest(ImageRequest):
    """POST /v1/images/edits: the form fields beside the files (`image` or `image[]`, `mask`), as the
    OpenAI SDK's images.edit sends them (numbers and booleans as text), plus GeekAI's extensions."""

    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS, description="What the edited image(s) show.")
    n: int = Field(1, ge=1, le=MAX_N, description="How many images to make.")
    size: str | None = Field(None, pattern=SIZE_PATTERN, description="WIDTHxHEIGHT, `auto`, or 1k/2k/4k.")
    quality: str | None = Field(None, max_length=32)
    response_format: Literal["url", "b64_json"] = "url"
    output_format: Literal["png", "jpeg", "jpg", "webp"] = "png"
    output_compression: int | None = Field(None, ge=0, le=100)
    background: Literal["transparent", "opaque", "auto"] | None = None
    input_fidelity: Literal["high", "low"] | None = Field(None, description="gpt-image: how closely to keep the input.")
    user: str | None = Field(None, max_length=256)
    stream: Literal[False] | None = Field(None, description="Streaming is not supported; omit or false.")
    partial_images: Literal[0] | None = None
    # GeekAI extensions, sent as form fields (the SDK's extra_body)
    callback_url: str | None = Field(
        None, max_length=2048, pattern=r"^https?://", description="Where the task's end is POSTed (Standard Webhooks)."
    )
    async_: bool = Field(False, alias="async", description="Answer 202 with a task id at once.")
    retries: int = Field(0, ge=0, le=10, description="Automatic retries on retryable upstream errors.")

    @field_validator("stream", "partial_images", mode="before")
    @classmethod
    def _form_literal(cls, value: Any, info: ValidationInfo) -> Any:
        # A form sends text; a Literal takes only its own value: "false" means false, "0" means 0.
        text = "false" if info.field_name == "stream" else "0"
        return (False if info.field_name == "stream" else 0) if value == text else value

    def generation(self) -> GenerationRequest:
        """The fields a generation shares, for the family checks and the adapters."""
        return generation_of(self.stored())


# Fields GenerationRequest does not have: an attempt hands them to the adapter as edit params.
EDIT_ONLY_FIELDS = frozenset({"input_fidelity"})


def generation_of(fields: dict[str, Any]) -> GenerationRequest:
    """The GenerationRequest of a stored edit's fields (edit-only fields left out)."""
    return GenerationRequest.model_validate({k: v for k, v in fields.items() if k not in EDIT_ONLY_FIELDS})


class ImageData(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    """A finished synchronous request: exactly OpenAI's body, plus the task's id and status."""

    created: int
    data: list[ImageData]
    usage: dict[str, Any] | None = None
    task_id: str
    task_status: TaskStatus


class TaskAccepted(BaseModel):
    """202: the task is queued (async) or still going when the synchronous wait ran out."""

    created: int
    task_id: str
    task_status: TaskStatus
    data: list[ImageData] = []


class TaskError(BaseModel):
    code: str
    message: str
    details: dict[str, Any] | None = None


class AttemptView(BaseModel):
    """One upstream call: which attempt, which fan-out slot, which model (route) and how it ended."""

    number: int
    slot: int
    model: str
    started_at: datetime
    ended_at: datetime | None = None
    upstream_status: int | None = None
    error_code: str | None = None


class TaskView(BaseModel):
    """GET /v1/images/{task_id}: GeekAI's retrieval shape."""

    model: str
    task_id: str
    task_status: TaskStatus
    created: int
    attempts: int = Field(description="Attempts made so far (each retry or fallback is one more).")
    cancel_requested: bool | None = Field(None, description="True once a cancel reached a running task.")
    data: list[ImageData] | None = Field(None, description="Only when task_status is succeed.")
    expired: bool | None = Field(
        None,
        description="True once the images were deleted for retention (IMAGEGATE_IMAGE_RETENTION_S): data is then [].",
    )
    usage: dict[str, Any] | None = None
    error: TaskError | None = Field(None, description="Only when task_status is failed.")
    attempt_log: list[AttemptView] = Field([], description="Every upstream call, in order.")
    deleted: bool | None = Field(None, description="True once the client deleted it: no images, no request.")
    queued_reason: QueuedReason | None = Field(
        None,
        description="Why a pending task is waiting: its model's upstream limits (`max_concurrency`, `rpm`, "
        "or a 429's slow-down) have no room for its calls yet. Waiting uses no retry. Null otherwise.",
    )

    @model_serializer(mode="wrap")
    def _queued_reason_always(self, handler):
        # Answered as null rather than left out (the other empty fields are left out), so a client
        # can tell "not waiting" from a gateway that does not know of the limits.
        data = handler(self)
        data.setdefault("queued_reason", None)
        return data


class BatchLine(RequestModel):
    """One line of a batch, as in OpenAI's Batch API input (method and url may be given; ignored)."""

    model_config = ConfigDict(extra="forbid")

    custom_id: str = Field(..., min_length=1, max_length=200)
    body: GenerationRequest
    method: Literal["POST"] | None = None
    url: Literal["/v1/images/generations", "/v1/images/generations/"] | None = None


class BatchCreate(RequestModel):
    """POST /v1/images/batches as JSON (JSONL of BatchLine is accepted too)."""

    model_config = ConfigDict(extra="forbid")

    requests: list[BatchLine] = Field(..., min_length=1, description="At most IMAGEGATE_MAX_BATCH (10 000).")
    callback_url: str | None = Field(None, max_length=2048, pattern=r"^https?://")
    metadata: dict[str, Any] | None = None


class BatchCounts(BaseModel):
    pending: int = 0
    running: int = 0
    succeed: int = 0
    failed: int = 0


class BatchView(BaseModel):
    id: str
    object: Literal["image.batch"] = "image.batch"
    status: BatchStatus
    created: int
    finished: int | None = None
    total: int
    counts: BatchCounts
    metadata: dict[str, Any] | None = None
    callback_url: str | None = None


class DeliveryQuery(RequestModel):
    """GET /v1/webhooks/deliveries: a task's or a batch's deliveries, else the key's latest."""

    model_config = ConfigDict(extra="ignore")

    task_id: str | None = Field(None, max_length=100)
    batch_id: str | None = Field(None, max_length=100)
    limit: int = Field(100, ge=1, le=1000)


class DeliveryView(BaseModel):
    """One delivery attempt of a webhook event."""

    id: str
    event_id: str
    type: str
    task_id: str | None = None
    batch_id: str | None = None
    attempt: int
    url: str
    status_code: int | None = None
    latency_ms: int
    error: str | None = None
    created: int


class DeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DeliveryView]


class RedeliveryQueued(BaseModel):
    event_id: str
    status: Literal["pending"] = "pending"


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, used for every error the gateway answers."""

    error: ErrorDetail
