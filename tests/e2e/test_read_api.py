"""The read API end to end: the real API server and worker, the OpenAI SDK, and `imagegate keys`
limiting a key to some models."""

from __future__ import annotations

import time
import uuid

import httpx
import openai
import pytest

from tests.e2e.test_keys_cli import assert_one_clear_line
from tests.support.fake_upstream import Step
from tests.support.flows import submit_async, wait_for_end
from tests.support.processes import run_cli

pytestmark = pytest.mark.e2e


def keyed_client(api_url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def new_key(env, *args: str) -> tuple[str, str]:
    name = f"read-{uuid.uuid4().hex[:8]}"
    result = run_cli(["keys", "create", "--name", name, *args], env)
    assert result.returncode == 0, result.stderr
    return name, result.stdout.strip().splitlines()[-1]


def test_a_succeeded_task_is_listed_with_urls_counted_then_deleted(env, api_url, worker):
    _, key = new_key(env)
    with keyed_client(api_url, key) as client:
        done = client.post(
            "/v1/images/generations",
            json={"model": "local", "prompt": "a lighthouse", "n": 2, "size": "32x32", "response_format": "b64_json"},
        ).json()
        assert done["task_status"] == "succeed" and done["data"][0]["b64_json"]
        task_id = done["task_id"]

        (listed,) = client.get("/v1/images").json()["data"]
        assert listed["task_id"] == task_id and listed["task_status"] == "succeed"
        urls = [item["url"] for item in listed["data"]]  # a list carries URLs, never base64
        assert len(urls) == 2 and all("b64_json" not in item for item in listed["data"])
        assert httpx.get(urls[0]).status_code == 200

        (usage,) = client.get("/v1/usage", params={"group_by": "model"}).json()["data"]
        assert (usage["model"], usage["succeeded"], usage["images"]) == ("local", 1, 2)
        assert usage["usage"]["generated_images"] == 2  # as the local upstream reported it

        deleted = client.delete(f"/v1/images/{task_id}")
        assert deleted.status_code == 200 and deleted.json()["deleted"] is True
        view = client.get(f"/v1/images/{task_id}").json()
        assert view["deleted"] is True and view["task_status"] == "succeed" and view["data"] == []
        assert httpx.get(urls[0]).status_code == 404  # the bytes are gone
        (usage,) = client.get("/v1/usage").json()["data"]
        assert usage["images"] == 2 and usage["usage"]["generated_images"] == 2


def test_deleting_a_task_polling_its_upstream_ends_it_cancelled(client, upstream, prompt):
    upstream.script(prompt, Step(pending_polls=10_000))
    task_id = submit_async(client, model="fake-async", prompt=prompt)
    deadline = time.monotonic() + 20
    while not upstream.calls_for(prompt, "poll") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.calls_for(prompt, "poll")
    deleted = client.delete(f"/v1/images/{task_id}").json()
    assert deleted == {"id": task_id, "object": "image.task", "deleted": True, "task_status": "running"}
    view = wait_for_end(client, task_id, timeout_s=30)
    assert view["task_status"] == "failed" and view["error"]["code"] == "cancelled" and view["deleted"] is True
    polls = len(upstream.calls_for(prompt, "poll"))
    time.sleep(1.5)
    assert len(upstream.calls_for(prompt, "poll")) == polls  # no more calls once it ended


def test_the_openai_sdk_lists_the_models_a_limited_key_may_use(env, api_url, worker):
    name, key = new_key(env, "--models", "fake-grok,local")
    sdk = openai.OpenAI(base_url=f"{api_url}/v1", api_key=key, max_retries=0, timeout=60)
    assert [model.id for model in sdk.models.list()] == ["local", "fake-grok"]
    grok = sdk.models.retrieve("fake-grok")
    assert grok.object == "model" and grok.owned_by == "openai"
    assert grok.model_extra["imagegate"]["family"] == "grok"
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("fake-dalle")
    with pytest.raises(openai.NotFoundError) as refused:
        sdk.images.generate(model="fake-dalle", prompt="a cat")
    assert refused.value.code == "model_not_found"

    result = run_cli(["keys", "update", "--name", name, "--models", "fake-dalle"], env)
    assert result.returncode == 0, result.stderr
    # Each API process applies it within IMAGEGATE_KEY_CACHE_TTL_S (15 s by default).
    deadline = time.monotonic() + 30
    while [model.id for model in sdk.models.list()] != ["fake-dalle"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [model.id for model in sdk.models.list()] == ["fake-dalle"]


def test_keys_models_mistakes_are_one_clear_line(env, migrated):
    result = run_cli(["keys", "create", "--name", f"bad-{uuid.uuid4().hex[:8]}", "--models", "local,dall-e-9"], env)
    assert_one_clear_line(result, "dall-e-9", "--models")
    result = run_cli(["keys", "update", "--name", f"nobody-{uuid.uuid4().hex[:8]}", "--models", "local"], env)
    assert_one_clear_line(result, "no live key named")
    name, _ = new_key(env)
    result = run_cli(["keys", "update", "--name", name, "--models", " , "], env)
    assert_one_clear_line(result, "--models")
    result = run_cli(["keys", "update", "--name", name, "--models", "local", "--all-models"], env)
    assert result.returncode != 0 and "Traceback" not in result.stderr and "not both" in result.stderr
    assert run_cli(["keys", "update", "--name", name, "--all-models"], env).returncode == 0
