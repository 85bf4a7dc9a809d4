"""`openai`: the OpenAI Images wire protocol, for OpenAI itself and OpenAI-compatible relays.

The helpers here (request body, reply parsing, errors) serve every adapter that speaks a dialect
of that protocol."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import httpx

from imagegate.app.failures import ErrorCode
from imagegate.app.providers import ModelConfig
from imagegate.app.schemas import GenerationRequest
from imagegate.workers import http
from imagegate.workers.adapters.base import (
    Capabilities,
    Generation,
    HttpAdapter,
    UpstreamError,
    UpstreamImage,
    error_for_status,
)

CONTENT_POLICY_CODES = {"content_policy_violation", "moderation_blocked", "content_filter"}


class OpenAIAdapter(HttpAdapter):
    name: ClassVar[str] = "openai"
    capabilities: ClassVar[Capabilities] = Capabilities()

    def generate(self, request: GenerationRequest) -> Generation:
        reply, document = call(
            self.http, self.config, self.api_key, "POST", "/images/generations", json=images_body(request, self.config)
        )
        return images_of(reply, document)


def images_body(request: GenerationRequest, config: ModelConfig) -> dict[str, Any]:
    """The fields the client sent, the upstream's model name, and the relay's array quirks."""
    body = request.upstream_params() | {"model": config.upstream_name}
    for name in config.wrap_params:  # some relays (a grok relay) want `[null, value]`
        if name in body:
            body[name] = [None, body[name]]
    return body


def call(
    client: httpx.Client, config: ModelConfig, api_key: str | None, method: str, path: str, **kwargs
) -> tuple[http.Reply, dict[str, Any]]:
    """One call to the upstream; an error reply raises UpstreamError, a good one gives its JSON."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    reply = http.request(
        client, method, f"{config.base_url.rstrip('/')}{path}", headers=headers, deadline_s=config.timeout_s, **kwargs
    )
    document = _json_object(reply.body)
    if reply.status >= 400:
        raise _error(reply, document)
    if document is None:
        raise UpstreamError(
            ErrorCode.UPSTREAM_BAD_RESPONSE,
            "upstream reply is not a JSON object",
            retryable=True,
            upstream_status=reply.status,
        )
    return reply, document


def images_of(reply: http.Reply, document: dict[str, Any]) -> Generation:
    items = document.get("data")
    if not isinstance(items, list) or not items:
        raise UpstreamError(
            ErrorCode.UPSTREAM_BAD_RESPONSE,
            "upstream reply has no images",
            retryable=True,
            upstream_status=reply.status,
        )
    images = [
        UpstreamImage(b64_json=item.get("b64_json"), url=item.get("url"), revised_prompt=item.get("revised_prompt"))
        for item in items
        if isinstance(item, dict) and (item.get("b64_json") or item.get("url"))
    ]
    if len(images) != len(items):
        raise UpstreamError(
            ErrorCode.UPSTREAM_BAD_RESPONSE,
            "upstream image without b64_json or url",
            retryable=True,
            upstream_status=reply.status,
        )
    usage = document.get("usage")
    return Generation(images, usage if isinstance(usage, dict) else None, reply.status)


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        document = json.loads(body)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def _error(reply: http.Reply, document: dict[str, Any] | None) -> UpstreamError:
    error = (document or {}).get("error")
    error = error if isinstance(error, dict) else {}
    # Uncut and unredacted: the runner redacts, then cuts (see TaskRunner._failure).
    message = str(error.get("message") or f"upstream answered HTTP {reply.status}")
    details = {"upstream_status": reply.status}
    if error.get("code"):
        details["upstream_code"] = str(error["code"])
    failure = error_for_status(reply.status, message, retry_after_s=http.retry_after_s(reply.headers), details=details)
    if reply.status == 400 and str(error.get("code")) in CONTENT_POLICY_CODES:
        failure.code = ErrorCode.CONTENT_POLICY
    return failure
