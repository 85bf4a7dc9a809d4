"""Turn what an upstream returned (bytes, base64 or a URL) into stored image bytes."""

from __future__ import annotations

import base64
import binascii

import httpx

from imagegate.app.failures import ErrorCode
from imagegate.app.providers import ModelConfig
from imagegate.app.settings import Settings
from imagegate.app.stores.attempts import NewImage
from imagegate.workers import http
from imagegate.workers.adapters.base import UpstreamError, UpstreamImage
from imagegate.workers.outbound import CheckedClients, same_origin


def sniff_content_type(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return None


def _decode_b64(text: str) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        raise UpstreamError(
            ErrorCode.UPSTREAM_BAD_RESPONSE, "upstream b64_json is not base64", retryable=True
        ) from None


def fetch_images(
    images: list[UpstreamImage],
    *,
    client: httpx.Client,
    checked: CheckedClients,
    config: ModelConfig,
    settings: Settings,
) -> list[NewImage]:
    """client: the upstreams' client, for images on the model's own origin; checked: for the rest."""
    stored = []
    for image in images:
        if image.data is not None:
            data = image.data
        elif image.b64_json:
            data = _decode_b64(image.b64_json)
        elif image.url and image.url.startswith("data:"):  # chat models inline their image so
            data = _decode_b64(image.url)
        else:
            url = image.url or ""
            data = http.download(
                _client_for(url, client, checked, config),
                url,
                max_bytes=settings.max_download_bytes,
                deadline_s=settings.download_timeout_s,
            )
        content_type = sniff_content_type(data)
        if content_type is None:
            raise UpstreamError(
                ErrorCode.UPSTREAM_BAD_RESPONSE, "upstream returned something that is not an image", retryable=True
            )
        stored.append(NewImage(data=data, content_type=content_type, revised_prompt=image.revised_prompt))
    return stored


def _client_for(url: str, upstream: httpx.Client, checked: CheckedClients, config: ModelConfig) -> httpx.Client:
    # The model's own origin is the operator's choice, trusted like the calls to it: a self-hosted
    # upstream on a private address serves its images from itself. Anywhere else is checked.
    if same_origin(url, config.base_url):
        return upstream
    return checked.client(allow_private=config.allow_private_downloads)
