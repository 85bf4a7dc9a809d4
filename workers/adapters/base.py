"""The adapter port: one small class per upstream protocol, with one method.

An adapter turns a validated request into images. It raises UpstreamError (retryable or not)
and never touches the database or Celery; the runner does that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import httpx

from app.providers import ModelConfig
from app.schemas import GenerationRequest
from app.failures import ErrorCode


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
    code: str
    message: str
    retryable: bool
    upstream_status: int | None = None
    retry_after_s: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


# Retryable per the issue: connect errors, timeouts, 408, 409, 429, 5xx; never 4xx otherwise.
RETRYABLE_STATUSES = frozenset({408, 409, 429})


def error_for_status(status: int, message: str, *, retry_after_s: float | None = None,
                     details: dict[str, Any] | None = None) -> UpstreamError:
    if status == 429:
        code, retryable = ErrorCode.UPSTREAM_RATE_LIMITED, True
    elif status >= 500 or status in RETRYABLE_STATUSES:
        code, retryable = ErrorCode.UPSTREAM_ERROR, True
    elif status in (401, 403):
        code, retryable = ErrorCode.UPSTREAM_AUTH, False
    else:
        code, retryable = ErrorCode.UPSTREAM_REJECTED, False
    return UpstreamError(code, message, retryable, upstream_status=status, retry_after_s=retry_after_s,
                         details=details or {})


class HttpAdapter:
    """The constructor every adapter that calls an HTTP upstream shares."""

    def __init__(self, config: ModelConfig, http: httpx.Client, api_key: str | None) -> None:
        self.config = config
        self.http = http
        self.api_key = api_key


class Adapter(Protocol):
    name: ClassVar[str]
    # Capabilities, as data: how many images one upstream call can return (None: any n).
    max_images_per_call: ClassVar[int | None]

    def __init__(self, config: ModelConfig, http: httpx.Client, api_key: str | None) -> None: ...

    def generate(self, request: GenerationRequest) -> Generation: ...


class PollingAdapter(Protocol):
    """An upstream that is itself asynchronous: submit once, then poll its task id.

    The runner polls by rescheduling the Celery task, never by holding a worker slot."""

    name: ClassVar[str]
    max_images_per_call: ClassVar[int | None]

    def __init__(self, config: ModelConfig, http: httpx.Client, api_key: str | None) -> None: ...

    def submit(self, request: GenerationRequest) -> str: ...

    def poll(self, upstream_task_id: str) -> Generation | None:
        """The images once the upstream task succeeded; None while it is still going."""
        ...


def is_polling(adapter: object) -> bool:
    return callable(getattr(adapter, "submit", None)) and callable(getattr(adapter, "poll", None))
