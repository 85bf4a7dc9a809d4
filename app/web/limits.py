"""Bounds on what one client can hold of an API process: requests in progress per client address,
and the time to receive a request body. gunicorn itself bounds the time to receive the headers
(its keep-alive timeout wraps every request's parsing) but not the body, and has no per-client limit.

Behind a reverse proxy every request comes from the proxy's address: let the proxy limit per
client (nginx `limit_conn`, `client_body_timeout`) and raise IMAGEGATE_MAX_REQUESTS_PER_CLIENT.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from flask import request
from werkzeug.datastructures import MultiDict
from werkzeug.wsgi import ClosingIterator

from imagegate.app.web.errors import ApiError


class BodyTimeout(Exception):
    """The client took longer than IMAGEGATE_BODY_TIMEOUT_S to send its body."""


def _gevent_timeout(seconds: float):
    """A gevent.Timeout when this process runs under gevent (the API server), else None: a plain
    thread cannot be interrupted in a blocking read, and tests' in-process clients never trickle."""
    try:
        from gevent import Timeout, monkey
    except ImportError:
        return None
    return Timeout(seconds, BodyTimeout) if monkey.is_module_patched("socket") else None


def read_body(timeout_s: float) -> bytes:
    """The request body, read within timeout_s; else 408 in OpenAI's shape, and the connection closed."""
    return _within(timeout_s, lambda: request.get_data(cache=False))


def read_form(timeout_s: float) -> tuple[MultiDict, MultiDict]:
    """A multipart body's (fields, files), received within timeout_s like read_body's."""
    return _within(timeout_s, lambda: (request.form, request.files))


def _within(timeout_s: float, read: Callable[[], Any]) -> Any:
    timeout = _gevent_timeout(timeout_s)
    if timeout is None:
        return read()
    try:
        with timeout:
            return read()
    except BodyTimeout:
        _close_after_reply()
        raise ApiError(
            408,
            f"The request body did not arrive within {timeout_s:g} s.",
            code="request_timeout",
        ) from None


def _close_after_reply() -> None:
    # The rest of the body will never be read: stop receiving so gunicorn does not wait for it
    # to reuse the connection; the reply is still sent.
    sock = request.environ.get("gunicorn.socket")
    if sock is not None:
        try:
            import socket

            sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass


class ClientLimit:
    """WSGI middleware: at most `limit` requests in progress per client address in this process;
    the next one is answered 429 at once, before its body is read. A streamed response counts
    until it is closed. Greenlets of one process share the counter without locks (no switch
    happens between the read and the write of a count)."""

    def __init__(self, app: Callable, limit: int):
        self._app, self._limit = app, limit
        self._active: defaultdict[str, int] = defaultdict(int)

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        client = environ.get("REMOTE_ADDR") or ""
        if self._active.get(client, 0) >= self._limit:
            return _too_many(start_response, self._limit)
        self._active[client] += 1
        try:
            result = self._app(environ, start_response)
        except BaseException:
            self._release(client)
            raise
        return ClosingIterator(result, lambda: self._release(client))

    def in_progress(self, client: str) -> int:
        return self._active.get(client, 0)

    def _release(self, client: str) -> None:
        self._active[client] -= 1
        if self._active[client] <= 0:
            del self._active[client]


def _too_many(start_response: Callable, limit: int) -> list[bytes]:
    body = json.dumps(
        {
            "error": {
                "message": f"Too many requests in progress from your address (at most {limit} per server process).",
                "type": "rate_limit_error",
                "param": None,
                "code": "too_many_concurrent_requests",
            }
        }
    ).encode()
    start_response(
        "429 Too Many Requests",
        [("Content-Type", "application/json"), ("Content-Length", str(len(body))), ("Retry-After", "1")],
    )
    return [body]
