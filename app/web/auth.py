"""Bearer-key authentication for every /v1 route."""

from __future__ import annotations

from flask import g, request

from imagegate.app.logs import bind_contextvars
from imagegate.app.web.errors import ApiError
from imagegate.app.web.services import services


def require_api_key() -> None:
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if not header:
        raise ApiError(
            401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.", code="missing_api_key"
        )
    caller = services().keys.authenticate(presented.strip()) if scheme.lower() == "bearer" else None
    if caller is None:
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
    g.caller = caller
    g.api_key_id = caller.id
    bind_contextvars(api_key_id=str(caller.id))  # the key's id, never the key, on the request's log lines
