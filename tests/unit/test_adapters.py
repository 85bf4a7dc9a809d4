"""Each built-in adapter against a scripted upstream (httpx.MockTransport): no server, no services."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from PIL import Image

from imagegate.app.failures import ErrorCode
from imagegate.app.providers import ModelConfig
from imagegate.app.schemas import GenerationRequest
from imagegate.workers.adapters.base import UpstreamError
from imagegate.workers.adapters.chat_image import ChatImageAdapter
from imagegate.workers.adapters.geekai_async import GeekAIAsyncAdapter
from imagegate.workers.adapters.local import LocalAdapter
from imagegate.workers.adapters.openai import OpenAIAdapter

BASE_URL = "https://upstream.example/v1"
KEY = "sk-test-upstream-key-0123456789"
PNG_B64 = base64.b64encode(b"\x89PNG\r\n\x1a\n fake").decode()


def mock_client(*replies: httpx.Response, seen: list[httpx.Request] | None = None) -> httpx.Client:
    """A client whose upstream answers the given replies in order, recording each request."""
    queue = list(replies)

    def answer(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        return queue.pop(0)

    return httpx.Client(transport=httpx.MockTransport(answer))


def config(adapter: str, **values) -> ModelConfig:
    return ModelConfig(name="model-x", adapter=adapter, base_url=BASE_URL, **values)


def request(**values) -> GenerationRequest:
    return GenerationRequest.model_validate({"prompt": "a red kite", **values})


def error_reply(status: int, message: str = "nope", code: str | None = None, **headers) -> httpx.Response:
    return httpx.Response(
        status, json={"error": {"message": message, "type": "invalid_request_error", "code": code}}, headers=headers
    )


# -- openai -----------------------------------------------------------------------------------


def test_openai_posts_the_request_with_the_key_and_reads_b64_images():
    seen: list[httpx.Request] = []
    reply = httpx.Response(
        200,
        json={"created": 1, "data": [{"b64_json": PNG_B64, "revised_prompt": "a kite"}], "usage": {"total_tokens": 7}},
    )
    adapter = OpenAIAdapter(config("openai", upstream_model="dall-e-3"), mock_client(reply, seen=seen), KEY)

    generation = adapter.generate(request(size="1024x1024"))

    assert [image.b64_json for image in generation.images] == [PNG_B64]
    assert generation.images[0].revised_prompt == "a kite"
    assert generation.usage == {"total_tokens": 7} and generation.upstream_status == 200
    (sent,) = seen
    assert sent.method == "POST" and str(sent.url) == f"{BASE_URL}/images/generations"
    assert sent.headers["Authorization"] == f"Bearer {KEY}"
    body = json.loads(sent.content)
    assert body["model"] == "dall-e-3" and body["prompt"] == "a red kite" and body["size"] == "1024x1024"


def test_openai_reads_url_images_and_sends_no_key_when_none_is_configured():
    seen: list[httpx.Request] = []
    reply = httpx.Response(
        200, json={"data": [{"url": "https://cdn.example/1.png"}, {"url": "https://cdn.example/2.png"}]}
    )
    generation = OpenAIAdapter(config("openai"), mock_client(reply, seen=seen), None).generate(request(n=2))
    assert [image.url for image in generation.images] == ["https://cdn.example/1.png", "https://cdn.example/2.png"]
    assert "Authorization" not in seen[0].headers


@pytest.mark.parametrize(
    "status, code, retryable",
    [
        (400, ErrorCode.UPSTREAM_REJECTED, False),
        (401, ErrorCode.UPSTREAM_AUTH, False),
        (429, ErrorCode.UPSTREAM_RATE_LIMITED, True),
        (500, ErrorCode.UPSTREAM_ERROR, True),
    ],
)
def test_openai_maps_error_statuses(status, code, retryable):
    adapter = OpenAIAdapter(config("openai"), mock_client(error_reply(status, "scripted")), KEY)
    with pytest.raises(UpstreamError) as caught:
        adapter.generate(request())
    assert (caught.value.code, caught.value.retryable, caught.value.upstream_status) == (code, retryable, status)
    assert caught.value.message == "scripted"


def test_openai_429_carries_retry_after():
    adapter = OpenAIAdapter(config("openai"), mock_client(error_reply(429, **{"Retry-After": "12"})), KEY)
    with pytest.raises(UpstreamError) as caught:
        adapter.generate(request())
    assert caught.value.code == ErrorCode.UPSTREAM_RATE_LIMITED and caught.value.retry_after_s == 12.0


def test_openai_content_policy_400_is_its_own_code():
    reply = error_reply(400, "refused", code="content_policy_violation")
    with pytest.raises(UpstreamError) as caught:
        OpenAIAdapter(config("openai"), mock_client(reply), KEY).generate(request())
    assert caught.value.code == ErrorCode.CONTENT_POLICY and not caught.value.retryable
    assert caught.value.details["upstream_code"] == "content_policy_violation"


@pytest.mark.parametrize(
    "reply",
    [
        httpx.Response(200, text="<html>gateway</html>"),
        httpx.Response(200, json={"data": []}),
        httpx.Response(200, json={"data": [{"revised_prompt": "no image"}]}),
    ],
)
def test_openai_unreadable_success_is_a_retryable_bad_response(reply):
    with pytest.raises(UpstreamError) as caught:
        OpenAIAdapter(config("openai"), mock_client(reply), KEY).generate(request())
    assert caught.value.code == ErrorCode.UPSTREAM_BAD_RESPONSE and caught.value.retryable


def test_openai_wraps_the_params_a_relay_wants_as_arrays():
    seen: list[httpx.Request] = []
    reply = httpx.Response(200, json={"data": [{"b64_json": PNG_B64}]})
    adapter = OpenAIAdapter(config("openai", wrap_params=["quality"]), mock_client(reply, seen=seen), KEY)
    adapter.generate(request(quality="low", size="1024x1024"))
    body = json.loads(seen[0].content)
    assert body["quality"] == [None, "low"] and body["size"] == "1024x1024"


# -- chat_image -------------------------------------------------------------------------------


def chat_reply(message: dict) -> httpx.Response:
    return httpx.Response(
        200,
        json={
            "id": "c1",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", **message}}],
            "usage": {"total_tokens": 42},
        },
    )


def test_chat_image_parses_the_image_from_a_chat_reply():
    seen: list[httpx.Request] = []
    url = "https://cdn.example/cat.png"
    reply = chat_reply({"content": f"here you go\n![]({url})\n", "image": {"url": url}})
    adapter = ChatImageAdapter(
        config("chat_image", upstream_model="gemini-2.5-flash-image", image_generation=True, system_prompt="draw"),
        mock_client(reply, seen=seen),
        KEY,
    )

    generation = adapter.generate(request())

    assert [image.url for image in generation.images] == [url]  # the repeated URL once
    assert generation.usage == {"total_tokens": 42}
    body = json.loads(seen[0].content)
    assert str(seen[0].url) == f"{BASE_URL}/chat/completions"
    assert body["model"] == "gemini-2.5-flash-image" and body["image_generation"] is True
    assert body["messages"] == [{"role": "system", "content": "draw"}, {"role": "user", "content": "a red kite"}]


def test_chat_image_reads_images_arrays_and_data_uris():
    data_uri = f"data:image/png;base64,{PNG_B64}"
    reply = chat_reply({"content": "ok", "images": [{"type": "image_url", "image_url": {"url": data_uri}}]})
    generation = ChatImageAdapter(config("chat_image"), mock_client(reply), KEY).generate(request())
    assert [image.url for image in generation.images] == [data_uri]


def test_chat_image_reply_without_an_image_is_retryable():
    reply = chat_reply({"content": "I can only describe a kite."})
    with pytest.raises(UpstreamError) as caught:
        ChatImageAdapter(config("chat_image"), mock_client(reply), KEY).generate(request())
    assert caught.value.code == ErrorCode.NO_IMAGE and caught.value.retryable


def test_chat_image_sends_input_images_as_image_url_parts():
    seen: list[httpx.Request] = []
    reply = chat_reply({"content": "![](https://cdn.example/x.png)"})
    adapter = ChatImageAdapter(config("chat_image"), mock_client(reply, seen=seen), KEY)
    adapter.generate(request(image="https://example.com/cat.png"))
    (user,) = json.loads(seen[0].content)["messages"]
    assert user["content"][1] == {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}


# -- geekai_async -----------------------------------------------------------------------------


def test_geekai_async_submits_then_polls_until_the_images():
    seen: list[httpx.Request] = []
    client = mock_client(
        httpx.Response(200, json={"task_id": "up-1", "task_status": "pending", "data": []}),
        httpx.Response(200, json={"task_id": "up-1", "task_status": "running", "data": []}),
        httpx.Response(
            200, json={"task_id": "up-1", "task_status": "succeed", "data": [{"url": "https://cdn.example/k.png"}]}
        ),
        seen=seen,
    )
    adapter = GeekAIAsyncAdapter(config("geekai_async", upstream_model="kling-v2"), client, KEY)

    assert adapter.submit(request(n=1)) == "up-1"
    assert adapter.poll("up-1") is None
    generation = adapter.poll("up-1")

    assert [image.url for image in generation.images] == ["https://cdn.example/k.png"]
    submit, *polls = seen
    assert json.loads(submit.content)["async"] is True and json.loads(submit.content)["model"] == "kling-v2"
    assert [(poll.method, str(poll.url)) for poll in polls] == [("GET", f"{BASE_URL}/images/up-1")] * 2
    assert all(sent.headers["Authorization"] == f"Bearer {KEY}" for sent in seen)


def test_geekai_async_submit_without_a_task_id_is_a_bad_response():
    client = mock_client(httpx.Response(200, json={"task_status": "pending"}))
    with pytest.raises(UpstreamError) as caught:
        GeekAIAsyncAdapter(config("geekai_async"), client, KEY).submit(request())
    assert caught.value.code == ErrorCode.UPSTREAM_BAD_RESPONSE


@pytest.mark.parametrize(
    "upstream_code, code, retryable",
    [
        ("generation_failed", ErrorCode.UPSTREAM_ERROR, True),
        ("sensitive_content", ErrorCode.CONTENT_POLICY, False),
    ],
)
def test_geekai_async_failed_upstream_task(upstream_code, code, retryable):
    client = mock_client(
        httpx.Response(
            200,
            json={
                "task_id": "up-1",
                "task_status": "failed",
                "error": {"code": upstream_code, "message": "gpu on fire"},
            },
        )
    )
    with pytest.raises(UpstreamError) as caught:
        GeekAIAsyncAdapter(config("geekai_async"), client, KEY).poll("up-1")
    assert (caught.value.code, caught.value.retryable) == (code, retryable)
    assert caught.value.details == {"upstream_task_id": "up-1", "upstream_code": upstream_code}


# -- local ------------------------------------------------------------------------------------


def test_local_renders_the_requested_number_size_and_format():
    adapter = LocalAdapter(ModelConfig(name="local", adapter="local"), mock_client(), None)
    generation = adapter.generate(request(n=2, size="64x48", output_format="jpeg"))
    assert len(generation.images) == 2 and generation.usage == {"generated_images": 2}
    for image in generation.images:
        with Image.open(io.BytesIO(image.data)) as picture:
            assert picture.format == "JPEG" and picture.size == (64, 48)
    assert generation.images[0].data != generation.images[1].data  # each index drawn apart


@pytest.mark.parametrize("size", ["5000x5000", "8k"])
def test_local_refuses_a_size_past_its_limit_with_the_enum_code(size):
    adapter = LocalAdapter(ModelConfig(name="local", adapter="local"), mock_client(), None)
    with pytest.raises(UpstreamError) as caught:
        adapter.generate(request(size=size))
    assert caught.value.code is ErrorCode.UPSTREAM_REJECTED and not caught.value.retryable
