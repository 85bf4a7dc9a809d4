"""An upstream's base64 image becomes the same bytes however it is wrapped, and what is not base64
is a retryable bad response. No network: fetch_images with base64 only never calls a client."""

from __future__ import annotations

import base64

import pytest

from imagegate.app.failures import ErrorCode
from imagegate.app.providers import ModelConfig
from imagegate.app.settings import Settings
from imagegate.workers.adapters.base import UpstreamError, UpstreamImage
from imagegate.workers.images import fetch_images
from tests.support.fake_http import png_bytes

PNG = png_bytes()


def _fetched(image: UpstreamImage) -> bytes:
    config = ModelConfig(name="m", adapter="openai", base_url="http://127.0.0.1:9/v1")
    settings = Settings(secret_key="x")
    [stored] = fetch_images([image], client=None, checked=None, config=config, settings=settings)
    return stored.data


@pytest.mark.parametrize(
    "text",
    [
        base64.b64encode(PNG).decode(),
        base64.encodebytes(PNG).decode(),  # MIME style: a line break every 76 characters
        "data:image/png;base64," + base64.b64encode(PNG).decode(),
    ],
    ids=["plain", "line-broken", "data-url"],
)
def test_a_base64_image_is_stored_as_its_bytes(text):
    assert _fetched(UpstreamImage(b64_json=text)) == PNG


@pytest.mark.parametrize("text", [base64.b64encode(PNG).decode()[:-3], "not base64 at all!"])
def test_what_is_not_base64_is_a_retryable_bad_response(text):
    with pytest.raises(UpstreamError) as raised:
        _fetched(UpstreamImage(b64_json=text))
    assert raised.value.code == ErrorCode.UPSTREAM_BAD_RESPONSE and raised.value.retryable
