"""The `chat_image` adapter against a real HTTP fake of a chat-completions relay, down to
stored PNG bytes. No database, broker or worker: the adapter and fetch_images only."""

from __future__ import annotations

import base64
import uuid

import pytest

from imagegate.app.failures import ErrorCode
from imagegate.app.providers import ModelConfig
from imagegate.app.schemas import GenerationRequest
from imagegate.app.settings import Settings
from imagegate.workers import http
from imagegate.workers.adapters.base import UpstreamError
from imagegate.workers.adapters.chat_image import ChatImageAdapter
from imagegate.workers.images import fetch_images
from imagegate.workers.outbound import CheckedClients
from tests.support.fake_chat import ChatStep, FakeChat, png_bytes

SYSTEM_PROMPT = "你是一个AI画图机器人"


@pytest.fixture(scope="module")
def fake():
    server = FakeChat().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http_client():
    with http.make_client() as client:
        yield client


@pytest.fixture(scope="module")
def config(fake) -> ModelConfig:
    return ModelConfig(
        name="gemini",
        adapter="chat_image",
        base_url=fake.base_url,
        system_prompt=SYSTEM_PROMPT,
        image_generation=True,
        allow_private_downloads=True,
        timeout_s=10,
    )


@pytest.fixture
def adapter(config, http_client) -> ChatImageAdapter:
    return ChatImageAdapter(config, http_client, "sk-test")


@pytest.fixture
def chat_prompt() -> str:
    return f"一只可爱的小猫 {uuid.uuid4().hex}"


def stored(generation, http_client, config):
    return fetch_images(
        generation.images,
        client=http_client,
        checked=CheckedClients(),
        config=config,
        settings=Settings(secret_key="x"),
    )


@pytest.mark.parametrize("style", ["geekai", "openrouter", "markdown_data"])
def test_each_reply_style_gives_exactly_one_png(style, fake, adapter, http_client, config, chat_prompt):
    fake.script(chat_prompt, ChatStep(style=style))
    generation = adapter.generate(GenerationRequest(prompt=chat_prompt))
    assert len(generation.images) == 1  # geekai's image.url and markdown name one image
    assert generation.upstream_status == 200 and generation.usage["total_tokens"] == 1302
    (image,) = stored(generation, http_client, config)
    assert image.content_type == "image/png" and image.data.startswith(b"\x89PNG\r\n\x1a\n")
    if style == "geekai":
        assert generation.images[0].url == fake.image_url
    else:
        assert generation.images[0].url.startswith("data:image/png;base64,")
        assert image.data == png_bytes(8, 8, (200, 30, 30))


def test_generation_body_has_system_prompt_and_image_generation(fake, adapter, chat_prompt):
    adapter.generate(GenerationRequest(prompt=chat_prompt, size="1024x1024", quality="high"))
    (call,) = fake.calls_for(chat_prompt)
    assert call.authorization == "Bearer sk-test"
    assert call.body == {
        "model": "gemini",
        "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": chat_prompt}],
        "image_generation": True,
    }  # no size, quality or n: chat models do not take them


def test_edit_request_sends_image_url_parts(fake, adapter, chat_prompt):
    bare = base64.b64encode(png_bytes()).decode()
    adapter.generate(GenerationRequest(prompt=chat_prompt, image=["https://example.com/logo.png", bare]))
    (call,) = fake.calls_for(chat_prompt)
    user = call.body["messages"][-1]
    assert user == {
        "role": "user",
        "content": [
            {"type": "text", "text": chat_prompt},
            {"type": "image_url", "image_url": {"url": "https://example.com/logo.png"}},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{bare}"}},
        ],
    }


def test_a_single_input_image_string_is_one_part(fake, adapter, chat_prompt):
    uri = "data:image/jpeg;base64," + base64.b64encode(b"\xff\xd8\xff").decode()
    adapter.generate(GenerationRequest(prompt=chat_prompt, image=uri))
    (call,) = fake.calls_for(chat_prompt)
    assert call.body["messages"][-1]["content"][1] == {"type": "image_url", "image_url": {"url": uri}}


def test_a_reply_without_an_image_is_a_retryable_failure(fake, adapter, chat_prompt):
    fake.script(chat_prompt, ChatStep(style="no_image"))
    with pytest.raises(UpstreamError) as caught:
        adapter.generate(GenerationRequest(prompt=chat_prompt))
    assert caught.value.code == "no_image_in_reply" and caught.value.retryable
    assert caught.value.upstream_status == 200


def test_a_server_error_is_retryable_with_its_retry_after(fake, adapter, chat_prompt):
    fake.script(chat_prompt, ChatStep(status=500, message="overloaded", retry_after="7"))
    with pytest.raises(UpstreamError) as caught:
        adapter.generate(GenerationRequest(prompt=chat_prompt))
    assert caught.value.code == ErrorCode.UPSTREAM_ERROR and caught.value.retryable
    assert caught.value.upstream_status == 500 and caught.value.retry_after_s == 7
    assert caught.value.message == "overloaded"


def test_a_bad_request_is_not_retryable(fake, adapter, chat_prompt):
    fake.script(chat_prompt, ChatStep(status=400, message="bad image", error_code="invalid_image"))
    with pytest.raises(UpstreamError) as caught:
        adapter.generate(GenerationRequest(prompt=chat_prompt))
    assert caught.value.code == ErrorCode.UPSTREAM_REJECTED and not caught.value.retryable
    assert caught.value.details["upstream_code"] == "invalid_image"


def test_image_urls_reads_every_place_a_relay_puts_the_image():
    from imagegate.workers.adapters.chat_image import image_urls

    document = {
        "choices": [
            {
                "message": {
                    "image": {"url": "https://cdn/a.png"},
                    "images": ["https://cdn/b.png", {"url": "https://cdn/c.png"}],
                    "content": [
                        {"type": "text", "text": '![x](https://cdn/a.png) and ![y](<https://cdn/d.png> "t")'},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    ],
                }
            }
        ]
    }
    assert image_urls(document) == [
        "https://cdn/a.png",
        "https://cdn/b.png",
        "https://cdn/c.png",
        "https://cdn/d.png",
        "data:image/png;base64,AAAA",
    ]
