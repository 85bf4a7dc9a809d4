"""Checks every accepted request passes, one or a batch's many: the model exists and can do what
is asked, a callback URL is public, and the Idempotency-Key header."""

from __future__ import annotations

from typing import Any

from flask import g, request

from imagegate.app.families import RequestRefused, check_request
from imagegate.app.idempotency import fingerprint
from imagegate.app.providers import ModelConfig
from imagegate.app.schemas import GenerationRequest
from imagegate.app.ssrf import UnsafeUrl, resolve_public
from imagegate.app.web.errors import ApiError
from imagegate.app.web.services import Services

MAX_IDEMPOTENCY_KEY = 255
IDEMPOTENCY_HEADER = {"Idempotency-Key": {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY}}


def usable_models(svc: Services) -> dict[str, ModelConfig]:
    """The models of the providers file this request's key may use, in the file's order."""
    caller = g.caller
    return {name: model for name, model in svc.models.items() if caller.may_use(name)}


def checked_model(svc: Services, body: GenerationRequest, prefix: str = "") -> tuple[str, ModelConfig]:
    # A key limited to some models defaults to the first of those; a model it may not use is
    # answered as one that does not exist.
    name = body.model or next(iter(usable_models(svc)), svc.default_model)
    model = svc.models.get(name) if g.caller.may_use(name) else None
    if model is None:
        raise ApiError(404, f"The model '{name}' does not exist.", param=f"{prefix}model", code="model_not_found")
    try:  # refuse what the model's family cannot do before anything is stored or queued
        check_request(body, model)
    except RequestRefused as exc:
        raise ApiError(400, exc.message, param=f"{prefix}{exc.param}", code="invalid_value") from None
    return name, model


def checked_callback(svc: Services, url: str | None, param: str = "callback_url") -> str | None:
    """The URL, once it is http(s) to a public address (checked again when delivering)."""
    if url is None:
        return None
    try:
        resolve_public(url, allow_private=svc.settings.webhook_allow_private)
    except UnsafeUrl as exc:
        raise ApiError(400, f"Invalid callback URL: {exc}.", param=param, code="invalid_callback_url") from None
    return url


def idempotency(document: Any) -> tuple[str, str] | None:
    """(Idempotency-Key, fingerprint of the request) when the client sent the header."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not key.strip() or len(key) > MAX_IDEMPOTENCY_KEY or "\x00" in key:  # Postgres text takes no NUL
        raise ApiError(
            400,
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters.",
            param="Idempotency-Key",
            code="invalid_idempotency_key",
        )
    return key, fingerprint(document)


def default_callback() -> str | None:
    return g.caller.callback_url
