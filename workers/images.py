"""Turn what an upstream returned (bytes, base64 or a URL) into stored image bytes."""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable

import httpx
import pybase64

from imagegate.app.failures import ErrorCode
from imagegate.app.image_store import ImageStore, image_key
from imagegate.app.providers import ModelConfig
from imagegate.app.settings import Settings
from imagegate.app.stores.attempts import AttemptStore, NewImage
from imagegate.workers import http
from imagegate.workers.adapters.base import UpstreamError, UpstreamImage
from imagegate.workers.outbound import CheckedClients, same_origin

log = logging.getLogger(__name__)


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
    try:  # strict first, SIMD-fast; the lenient form (it skips newlines and the like) is ~25x slower
        return pybase64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error is one
        pass
    try:
        return pybase64.b64decode(text)
    except ValueError:
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


def put_images(store: ImageStore, task_id: uuid.UUID, images: list[NewImage]) -> list[NewImage]:
    """Put each image's bytes in the image store (none to put when the rows hold them): done before
    the transaction that writes the rows, so a committed row always has its bytes. Each image comes
    back with its key; a put that fails takes back the ones already made."""
    if store.in_rows:
        return images
    kept: list[NewImage] = []
    try:
        for image in images:
            key = image.key or image_key(task_id, image.id, image.content_type)
            if image.key is None:
                store.put(key, image.data, image.content_type)
            kept.append(dataclasses.replace(image, key=key))
    except Exception:
        discard_images(store, kept)
        raise
    return kept


def discard_images(store: ImageStore, images: list[NewImage]) -> None:
    """Delete the stored bytes of images whose rows were not written; a failure only leaves bytes no
    row points at (never served), so it is logged, not raised."""
    keys = [image.key for image in images if image.key]
    if keys:
        try:
            store.delete(keys)
        except Exception as exc:
            log.warning("could not delete %d unreferenced image(s) from the image store: %s", len(keys), exc)


def put_while_leased(
    store: ImageStore, task_id: uuid.UUID, images: list[NewImage], lease_left_s: Callable[[], float]
) -> list[NewImage]:
    """put_images, retried through an outage of the store while the attempt's lease lasts: the
    upstream was paid for these images (as the runner's database writes are retried)."""
    pause = 0.2
    while True:
        try:
            return put_images(store, task_id, images)
        except Exception as exc:
            left = lease_left_s() - pause - 1.0
            if left <= 0:
                raise
            log.warning("image store unavailable (%s: %s); retrying for up to %.0f s", type(exc).__name__, exc, left)
            time.sleep(pause)
            pause = min(pause * 2, 2.0)


def discard_unwritten(store: ImageStore, attempts: AttemptStore, images: list[NewImage]) -> None:
    """After a refused write, delete the bytes of the images that have no row. Refused after a commit
    whose reply was lost, the rows may exist: hence the check. Unknown, the bytes stay (no row
    points at them; nothing serves them)."""
    if not any(image.key for image in images):
        return
    try:
        written = attempts.images_written([image.id for image in images])
    except Exception as exc:
        log.warning("could not check which images were written; their bytes stay: %s", exc)
        return
    discard_images(store, [image for image in images if image.id not in written])
