"""`chat_image`: models that draw inside a chat completion (Gemini image models, gpt-4o-image, ...).

One `POST /chat/completions` per image: the prompt (and any input images, as `image_url` content
parts) goes in as the user message, and the image comes back somewhere in the assistant message.
Relays put it in different places, so all of them are read:

- `message.image.url` (GeekAI),
- `message.images[]` (OpenRouter: `{"type": "image_url", "image_url": {"url": ...}}`, `{"url": ...}` or strings),
- markdown images `![...](URL)` and bare `data:image/...;base64,...` URIs in `message.content`.

Streaming replies are not supported: we never ask for `stream`, and the Gemini image models do not
stream anyway. A reply without an image (the seed's "Gemini 不出图") is a retryable failure.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from imagegate.app.edits import EditInputs
from imagegate.app.failures import ErrorCode
from imagegate.app.providers import ModelConfig
from imagegate.app.schemas import GenerationRequest
from imagegate.workers.adapters.base import (
    Capabilities,
    Generation,
    HttpAdapter,
    UpstreamError,
    UpstreamImage,
    with_input_fields,
)
from imagegate.workers.adapters.openai import call

NO_IMAGE = ErrorCode.NO_IMAGE

# `![alt](URL)` or `![alt](<URL> "title")`; the URL may be a data: URI.
MARKDOWN_IMAGE = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
DATA_URI = re.compile(r"data:image/[\w.+-]+;base64,[A-Za-z0-9+/=]+")


class ChatImageAdapter(HttpAdapter):
    name: ClassVar[str] = "chat_image"
    # A chat reply carries one image; the runner fans out concurrent calls for n > 1.
    capabilities: ClassVar[Capabilities] = Capabilities(max_images_per_call=1, edits=True)

    def generate(self, request: GenerationRequest) -> Generation:
        reply, document = call(
            self.http, self.config, self.api_key, "POST", "/chat/completions", json=chat_body(request, self.config)
        )
        urls = image_urls(document)
        if not urls:
            raise UpstreamError(
                NO_IMAGE, "the model answered without an image", retryable=True, upstream_status=reply.status
            )
        usage = document.get("usage")
        # Never more than the call asked for, should the model draw a few variants.
        images = [UpstreamImage(url=url) for url in urls[: request.n]]
        return Generation(images, usage if isinstance(usage, dict) else None, reply.status)

    def edit(self, request: GenerationRequest, inputs: EditInputs) -> Generation:
        """The images to edit go in as `image_url` parts of the user message; a chat has no mask."""
        if inputs.mask is not None:
            raise UpstreamError(
                ErrorCode.UPSTREAM_REJECTED, "this chat model takes no mask; send the edit without one", False
            )
        return self.generate(with_input_fields(request, inputs))


def chat_body(request: GenerationRequest, config: ModelConfig) -> dict[str, Any]:
    """Only the model, the messages and the relay's `image_generation` switch: chat models take no
    size, quality, n or the like, and an unknown field may get the whole call rejected."""
    messages: list[dict[str, Any]] = []
    if config.system_prompt:  # the seed's remedy for a model that answers in words only
        messages.append({"role": "system", "content": config.system_prompt})
    inputs = [request.image] if isinstance(request.image, str) else list(request.image or [])
    if inputs:
        content: str | list[dict[str, Any]] = [{"type": "text", "text": request.prompt}] + [
            {"type": "image_url", "image_url": {"url": as_image_url(value)}} for value in inputs
        ]
    else:
        content = request.prompt
    messages.append({"role": "user", "content": content})
    body: dict[str, Any] = {"model": config.upstream_name, "messages": messages}
    if config.image_generation:
        body["image_generation"] = True
    return body


def as_image_url(value: str) -> str:
    """URLs and data: URIs go as they are; bare base64 is wrapped into a data: URI."""
    if value.startswith(("http://", "https://", "data:")):
        return value
    return f"data:image/png;base64,{value}"


def image_urls(document: dict[str, Any]) -> list[str]:
    """Every image of every choice, in order, each once (GeekAI repeats image.url in the markdown)."""
    found: list[str] = []
    choices = document.get("choices")
    for choice in choices if isinstance(choices, list) else []:
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict):
            found += _message_urls(message)
    # Only what the worker can fetch: http(s) downloads and data: URIs it decodes.
    return list(dict.fromkeys(url for url in found if url.startswith(("http://", "https://", "data:"))))


def _message_urls(message: dict[str, Any]) -> list[str]:
    urls = [_url_of(message.get("image"))]
    images = message.get("images")
    urls += [_url_of(item) for item in images] if isinstance(images, list) else []
    content = message.get("content")
    parts = content if isinstance(content, list) else [content]
    for part in parts:
        if isinstance(part, dict) and part.get("type") == "image_url":
            urls.append(_url_of(part))
            continue
        text = part.get("text") if isinstance(part, dict) else part
        if isinstance(text, str):
            urls += MARKDOWN_IMAGE.findall(text) + DATA_URI.findall(text)
    return [url for url in urls if url]


def _url_of(item: Any) -> str | None:
    """A URL from a string, `{"url": ...}` or `{"image_url": {"url": ...}}` (or `{"image_url": "..."}`)."""
    if isinstance(item, str):
        return item
    if not isinstance(item, dict):
        return None
    if "image_url" in item:
        return _url_of(item["image_url"])
    url = item.get("url")
    return url if isinstance(url, str) else None
