"""Why a task failed: its error codes, the failure a transition records, and what each means to a
client waiting on it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    """`error.code` of a failed task."""

    UPSTREAM_REJECTED = "upstream_rejected"  # 400/404/422 from the upstream
    CONTENT_POLICY = "content_policy_violation"  # the upstream refused the prompt
    UPSTREAM_AUTH = "upstream_auth_failed"  # 401/403: the gateway's upstream key is wrong
    UPSTREAM_ERROR = "upstream_error"  # 5xx, 408, 409, connection errors
    UPSTREAM_RATE_LIMITED = "upstream_rate_limited"  # 429
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_BAD_RESPONSE = "upstream_bad_response"  # a reply we cannot read images from
    NO_IMAGE = "no_image_in_reply"  # a chat model answered with text only
    MISCONFIGURED = "model_misconfigured"
    CANCELLED = "cancelled"  # the client cancelled it
    DEADLINE_EXCEEDED = "deadline_exceeded"  # not ended within IMAGEGATE_TASK_DEADLINE_S
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"  # IMAGEGATE_MAX_ATTEMPTS attempts, none ended it
    WORKER_LOST = "worker_lost"  # an attempt's worker stopped renewing its lease
    INTERNAL = "internal_error"


@dataclass(frozen=True)
class Failure:
    code: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)
    upstream_status: int | None = None

    def columns(self) -> dict[str, Any]:
        """The task's error columns recording this failure."""
        return {"error_code": self.code, "error_message": self.message, "error_details": self.details or None}


CANCELLED = Failure(ErrorCode.CANCELLED, "The task was cancelled.")


# The HTTP status a synchronous request answers with when its task failed.
HTTP_STATUS_OF_FAILURE: dict[str, int] = {
    ErrorCode.UPSTREAM_REJECTED: 400,
    ErrorCode.CONTENT_POLICY: 400,
    ErrorCode.UPSTREAM_AUTH: 502,
    ErrorCode.UPSTREAM_ERROR: 502,
    ErrorCode.UPSTREAM_RATE_LIMITED: 502,
    ErrorCode.UPSTREAM_TIMEOUT: 504,
    ErrorCode.UPSTREAM_BAD_RESPONSE: 502,
    ErrorCode.NO_IMAGE: 502,
    ErrorCode.MISCONFIGURED: 500,
    ErrorCode.CANCELLED: 409,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.ATTEMPTS_EXHAUSTED: 502,
    ErrorCode.WORKER_LOST: 502,
    ErrorCode.INTERNAL: 500,
}


def http_status_of_failure(code: str | None) -> int:
    return HTTP_STATUS_OF_FAILURE.get(code or "", 502)
