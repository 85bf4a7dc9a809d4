"""Every upstream call carries the Idempotency-Key of its task, attempt and slot (set by the runner
in `workers.http.current_call`): whatever the adapter, the one place that sends requests adds it.
scripts/cluster and the fault suite count calls per key at the fake upstream to prove that no
attempt calls its upstream twice."""

from __future__ import annotations

import contextvars

import httpx

from imagegate.workers.adapters.chat_image import ChatImageAdapter
from imagegate.workers.adapters.geekai_async import GeekAIAsyncAdapter
from imagegate.workers.adapters.openai import OpenAIAdapter
from imagegate.workers.http import current_call
from tests.unit.test_adapters import KEY, PNG_B64, chat_reply, config, mock_client, request

CALL = "imagegate-6f1c1f0e-8d5b-4a44-9d7e-1b0c2a1d0f00-2-1"


def in_call(key: str | None, function, *args):
    """Run function as the runner does: in a context whose current call is `key`."""

    def run():
        current_call.set(key)
        return function(*args)

    return contextvars.copy_context().run(run)


def images_reply() -> httpx.Response:
    return httpx.Response(200, json={"created": 1, "data": [{"b64_json": PNG_B64}]})


def test_openai_sends_the_attempts_idempotency_key():
    seen: list[httpx.Request] = []
    adapter = OpenAIAdapter(config("openai"), mock_client(images_reply(), seen=seen), KEY)

    in_call(CALL, adapter.generate, request())

    assert seen[0].headers["Idempotency-Key"] == CALL


def test_chat_image_sends_the_attempts_idempotency_key():
    seen: list[httpx.Request] = []
    data_uri = f"data:image/png;base64,{PNG_B64}"
    reply = chat_reply({"content": "ok", "images": [{"type": "image_url", "image_url": {"url": data_uri}}]})
    adapter = ChatImageAdapter(config("chat_image"), mock_client(reply, seen=seen), KEY)

    in_call(CALL, adapter.generate, request())

    assert seen[0].headers["Idempotency-Key"] == CALL


def test_an_asynchronous_upstreams_submit_and_poll_carry_the_key_of_their_step():
    seen: list[httpx.Request] = []
    submitted = httpx.Response(200, json={"task_id": "up-1", "task_status": "pending", "data": []})
    running = httpx.Response(200, json={"task_id": "up-1", "task_status": "running", "data": []})
    adapter = GeekAIAsyncAdapter(config("geekai_async"), mock_client(submitted, running, seen=seen), KEY)

    in_call(f"{CALL}-0", adapter.submit, request())
    in_call(f"{CALL}-1", adapter.poll, "up-1")

    assert [sent.headers["Idempotency-Key"] for sent in seen] == [f"{CALL}-0", f"{CALL}-1"]


def test_no_key_outside_an_attempt():
    seen: list[httpx.Request] = []
    adapter = OpenAIAdapter(config("openai"), mock_client(images_reply(), seen=seen), KEY)

    in_call(None, adapter.generate, request())

    assert "Idempotency-Key" not in seen[0].headers
