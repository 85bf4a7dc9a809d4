"""A request id for every request: the client's `x-request-id` when it is sane, else a new one.
It is echoed in the response and carried by every log line of the request (app/logs.py), so a
client's report, the API's lines and, through the task id logged at intake, the worker's meet."""

from __future__ import annotations

import uuid

from flask import Flask, Response, g, request

from imagegate.app.logs import bind_contextvars, clear_contextvars

HEADER = "X-Request-Id"
MAX_LENGTH = 200


def request_id_of(presented: str | None) -> str:
    """The presented id if it is short printable ASCII (safe in a header and a log line), else a new one."""
    if presented and len(presented) <= MAX_LENGTH and presented.isascii() and presented.isprintable():
        return presented
    return uuid.uuid4().hex


def register_request_ids(app: Flask) -> None:
    @app.before_request
    def _bind_request_id() -> None:
        g.request_id = request_id_of(request.headers.get(HEADER))
        clear_contextvars()  # a kept-alive connection's greenlet serves request after request
        bind_contextvars(request_id=g.request_id)

    @app.after_request
    def _echo_request_id(response: Response) -> Response:
        response.headers[HEADER] = g.get("request_id") or request_id_of(None)
        return response
