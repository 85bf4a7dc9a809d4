"""What the runner counts, in words the runner uses (the metrics are declared in app/metrics.py).

Each is a counter increment or a histogram observation in memory: no database round trip, no I/O.
Tasks are counted under the model the client asked for (`claim.model`); upstream calls, retries and
images under the model that served them (`claim.route`, which differs after a fallback).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TypeVar

from imagegate.app.failures import ErrorCode
from imagegate.app.metrics import metrics, seconds_since, status_class
from imagegate.app.stores.attempts import Claim, NewImage
from imagegate.workers.adapters.base import UpstreamError

T = TypeVar("T")


def upstream_outcome(error: UpstreamError) -> str:
    """The outcome label of a call that raised: its status class, else what kept the reply away."""
    if error.upstream_status is not None:
        return status_class(error.upstream_status)
    if error.code == ErrorCode.UPSTREAM_TIMEOUT:
        return "timeout"
    if error.code == ErrorCode.UPSTREAM_ERROR:  # workers.http: the connection failed or was refused
        return "connection_error"
    return "error"


def metered_call(model: str, kind: str, call: Callable[[], T]) -> T:
    """Make one upstream call (an adapter's generate, submit or poll), counted and timed."""
    started, outcome = time.perf_counter(), "error"
    try:
        result = call()
        status = getattr(result, "upstream_status", None)  # a Generation's; None from an adapter without HTTP
        outcome = status_class(status) if status else "2xx"
        return result
    except UpstreamError as exc:
        outcome = upstream_outcome(exc)
        raise
    finally:
        measured = metrics()
        measured.upstream_call_duration.labels(model, kind).observe(time.perf_counter() - started)
        measured.upstream_calls.labels(model, kind, outcome).inc()


def attempt_running() -> AbstractContextManager:
    """Around an attempt this process runs: counted in imagegate_attempts_in_flight meanwhile."""
    return metrics().attempts_in_flight.track_inprogress()


def count_started(claim: Claim) -> None:
    """The first attempt's claim: the task has left the queue."""
    if claim.attempt == 1 and claim.polls == 0 and claim.created_at is not None:
        metrics().task_time_to_start.labels(claim.model).observe(seconds_since(claim.created_at))


def count_ended(claim: Claim, status: str, error_code: str | None = None) -> None:
    measured = metrics()
    measured.tasks_ended.labels(claim.model, status, error_code or "none").inc()
    if claim.created_at is not None:
        measured.task_time_to_end.labels(claim.model, status).observe(seconds_since(claim.created_at))


def count_stored(claim: Claim, images: Sequence[NewImage]) -> None:
    if images:
        measured = metrics()
        measured.images_stored.labels(claim.route).inc(len(images))
        measured.image_bytes_stored.labels(claim.route).inc(sum(len(image.data) for image in images))


def count_retry(claim: Claim, error_code: str, fallback: str | None) -> None:
    if fallback is None:
        metrics().retries.labels(claim.route, error_code).inc()
    else:
        metrics().fallbacks.labels(claim.route, fallback).inc()
