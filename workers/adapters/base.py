"""The adapter port: one small class per upstream protocol, with one method (two when polling).

An adapter turns a validated request into images. It raises UpstreamError (retryable or not)
and never touches the database or Celery; the runner does that. What it can do is declared as
data (`capabilities`), which the runner reads; the upstream key comes in resolved, from the
model's `api_key_env` (see workers.adapters.resolve_upstreams).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import httpx
import pybase64

from imagegate.app.edits import EditInputs, InputFile
from imagegate.app.failures import ErrorCode
from imagegate.app.providers import ModelConfig
from imagegate.app.schemas import GenerationRequest


@dataclass(frozen=True)
class UpstreamImage:
    """One image as the upstream gave it: bytes, base64, or a URL the worker downloads."""

    data: bytes | None = None
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


@dataclass(frozen=True)
class Generation:
    images: list[UpstreamImage]
    usage: dict[str, Any] | None = None
    upstream_status: int | None = None


@dataclass
class UpstreamError(Exception):
    code: ErrorCode
    # May carry upstream text: the runner redacts it before it is stored or logged.
    message: str
    retryable: bool
    upstream_status: int | None = None
    retry_after_s: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


# Retryable per the issue: connect errors, timeouts, 408, 409, 429, 5xx; never 4xx otherwise.
RETRYABLE_STATUSES = frozenset({408, 409, 429})


def error_for_status(
    status: int, message: str, *, retry_after_s: float | None = None, details: dict[str, Any] | None = None
) -> UpstreamError:
    if status == 429:
        code, retryable = ErrorCode.UPSTREAM_RATE_LIMITED, True
    elif status >= 500 or status in RETRYABLE_STATUSES:
        code, retryable = ErrorCode.UPSTREAM_ERROR, True
    elif status in (401, 403):
        code, retryable = ErrorCode.UPSTREAM_AUTH, False
    else:
        code, retryable = ErrorCode.UPSTREAM_REJECTED, False
    return UpstreamError(
        code, message, retryable, upstream_status=status, retry_after_s=retry_after_s, details=details or {}
    )


@dataclass(frozen=True)
class Capabilities:
    """What an adapter can do, declared on its class for the runner to read."""

    # The upstream is itself asynchronous: the adapter is a PollingAdapter (submit, then poll).
    polling: bool = False
    # How many images one upstream call can return; None: any n. A model's own
    # `max_images_per_call` (or its family's) wins over this.
    max_images_per_call: int | None = None
    # Image edits (POST /v1/images/edits): the adapter has `edit` (`submit_edit` when polling). Keep
    # app.edits.ADAPTERS_THAT_EDIT in step for a built-in adapter (the API never imports this one).
    edits: bool = False


class Adapter(Protocol):
    """What every adapter class declares, and how the runner builds one: once per attempt, with the
    model's settings, the worker's shared HTTP client and the model's upstream key (None if none)."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    def __init__(self, config: ModelConfig, http: httpx.Client, api_key: str | None) -> None: ...


class ImageAdapter(Adapter, Protocol):
    """An upstream that answers a call with its images."""

    def generate(self, request: GenerationRequest) -> Generation: ...

    def edit(self, request: GenerationRequest, inputs: EditInputs) -> Generation:
        """With `capabilities.edits`: the images of an edit of `inputs`."""
        ...


class PollingAdapter(Adapter, Protocol):
    """An upstream that is itself asynchronous (`capabilities.polling`): submit once, then poll its
    task id. The runner polls by rescheduling the Celery task, never by holding a worker slot."""

    def submit(self, request: GenerationRequest) -> str:
        """The upstream's task id."""
        ...

    def poll(self, upstream_task_id: str) -> Generation | None:
        """The images once the upstream task succeeded; None while it is still going."""
        ...

    def submit_edit(self, request: GenerationRequest, inputs: EditInputs) -> str:
        """With `capabilities.edits`: submit an edit of `inputs`; the upstream's task id (then `poll`)."""
        ...


# The methods each kind of adapter must have, checked once when the adapters are loaded.
REQUIRED_METHODS = {False: ("generate",), True: ("submit", "poll")}
EDIT_METHODS = {False: "edit", True: "submit_edit"}


def data_uri(file: InputFile) -> str:
    return f"data:{file.content_type};base64,{pybase64.b64encode(file.data).decode()}"


def with_input_fields(request: GenerationRequest, inputs: EditInputs) -> GenerationRequest:
    """The request with the edit's files in GeekAI's `image` (one string, or a list for several) and
    `mask` fields, as base64 data: URIs."""
    images = [data_uri(image) for image in inputs.images]
    update: dict[str, Any] = {"image": images[0] if len(images) == 1 else images}
    if inputs.mask is not None:
        update["mask"] = data_uri(inputs.mask)
    return request.model_copy(update=update)


class HttpAdapter:
    """The constructor every adapter that calls an HTTP upstream shares."""

    def __init__(self, config: ModelConfig, http: httpx.Client, api_key: str | None) -> None:
        self.config = config
        self.http = http
        self.api_key = api_key
