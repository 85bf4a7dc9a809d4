"""Per-key limits at intake, as the API answers them (the counting is app/key_limits.py): what a
submit costs, its admission (429 in OpenAI's shape with Retry-After when over a limit), and the
x-ratelimit-* headers on every answer to an authenticated /v1 request.

A submit costs one request and its `n` images; a batch costs one request per line and the sum of
its lines' `n`, and takes one place per line among the key's pending tasks. A request whose cost
is larger than a whole limit can never be accepted: it is a 400 (not a 429 a client would retry).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from flask import Flask, Response, current_app, g, request
from sqlalchemy import Connection

from imagegate.app.key_limits import (
    Admit,
    Counters,
    KeyLimits,
    Verdict,
    Window,
    count_unfinished,
    lock_key_for_intake,
    make_counters,
)
from imagegate.app.settings import Settings
from imagegate.app.web.errors import ApiError

# Nothing tells when one of the key's tasks will end: a client refused for its pending tasks is
# asked to come back after this long.
PENDING_RETRY_AFTER_S = 5
EXTENSION = "imagegate.key_counters"


def register_key_limits(app: Flask, settings: Settings) -> None:
    """Counters in Redis (shared by every replica), or in memory without Redis (the embedded mode's
    single API process); and the x-ratelimit-* headers on every authenticated /v1 answer."""
    app.extensions[EXTENSION] = make_counters(settings.shared_redis_url)
    app.extensions["imagegate.key_limit_defaults"] = KeyLimits.defaults(settings)
    app.after_request(_rate_limit_headers)


def _counters() -> Counters:
    return current_app.extensions[EXTENSION]


def caller_limits() -> KeyLimits:
    """The limits in force for the authenticated key: its own, else the settings' defaults."""
    return KeyLimits.of(g.caller.limits, current_app.extensions["imagegate.key_limit_defaults"])


def admission(requests: int, images: int, param: str) -> Admit | None:
    """What the store runs in its transaction to admit a submit costing `requests` and `images`
    (None when the key has no limits). Raises at once (400) when the cost exceeds a whole limit."""
    limits, key_id = caller_limits(), g.api_key_id
    if not (limits.counted or limits.max_pending):
        return None
    _refuse_what_never_fits(limits, requests, images, param)
    counters = _counters()

    def admit(connection: Connection) -> Callable[[], None]:
        if limits.max_pending:
            lock_key_for_intake(connection, key_id)
            unfinished = count_unfinished(connection, key_id, limits.max_pending)
            if unfinished + requests > limits.max_pending:
                raise ApiError(
                    429,
                    f"This API key has {unfinished} task(s) pending or running and may have at most "
                    f"{limits.max_pending} at once; this request needs {requests} more. "
                    "Try again once some have ended.",
                    type="rate_limit_error",
                    code="too_many_pending_tasks",
                    headers={"Retry-After": str(PENDING_RETRY_AFTER_S)},
                )
        verdict = counters.take(key_id, limits, requests, images)
        g.key_windows = verdict
        if not verdict.taken:
            raise _over_a_window(verdict, requests, images)
        return verdict.refund

    return admit


def _refuse_what_never_fits(limits: KeyLimits, requests: int, images: int, param: str) -> None:
    for limit, cost, what in (
        (limits.rpm, requests, "requests per minute"),
        (limits.images_per_day, images, "images per day"),
        (limits.max_pending, requests, "tasks pending or running at once"),
    ):
        if limit and cost > limit:
            raise ApiError(
                400,
                f"This request needs {cost} of this API key's {limit} {what}: it can never be accepted. "
                "Split it into smaller requests.",
                param=param,
                code="exceeds_key_limit",
            )


def _over_a_window(verdict: Verdict, requests: int, images: int) -> ApiError:
    over = [
        (window, cost, what, code)
        for window, cost, what, code in (
            (verdict.requests, requests, "requests per minute", "rate_limit_exceeded"),
            (verdict.images, images, "images per day", "images_per_day_exceeded"),
        )
        if window is not None and window.used + cost > window.limit
    ]
    window, cost, what, code = over[0]
    wait_ms = max(found[0].reset_ms for found in over)
    return ApiError(
        429,
        f"Rate limit reached for {what} on this API key: limit {window.limit}, used {window.used}, "
        f"requested {cost}. Try again in {openai_duration(wait_ms)}.",
        type="rate_limit_error",
        code=code,
        headers={"Retry-After": str(max(1, math.ceil(wait_ms / 1000)))},
    )


def openai_duration(ms: int) -> str:
    """A duration as OpenAI's x-ratelimit-reset-* headers write it: "250ms", "1s", "6m0s", "1h2m3s"."""
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(math.ceil(ms / 1000), 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def _rate_limit_headers(response: Response) -> Response:
    """x-ratelimit-{limit,remaining,reset}-{requests,images} for each limit in force, on every answer
    to an authenticated /v1 request: as a submit left them, else read (nothing taken)."""
    if g.get("caller") is None or not request.path.startswith("/v1/"):
        return response
    limits = caller_limits()
    if not limits.counted:
        return response
    verdict = g.get("key_windows") or _counters().take(g.caller.id, limits, 0, 0)
    windows: tuple[tuple[str, Window | None], ...] = (("requests", verdict.requests), ("images", verdict.images))
    for name, window in windows:
        if window is not None:
            response.headers[f"x-ratelimit-limit-{name}"] = str(window.limit)
            response.headers[f"x-ratelimit-remaining-{name}"] = str(window.remaining)
            response.headers[f"x-ratelimit-reset-{name}"] = openai_duration(window.reset_ms)
    return response
