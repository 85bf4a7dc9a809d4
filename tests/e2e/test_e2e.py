"""End to end: a real API server (gunicorn), a real Celery worker, real Postgres and Redis, and a
fake upstream speaking the OpenAI wire format."""

from __future__ import annotations

import base64
import io
import time

import httpx
import openai
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from imagegate.app.queue import make_celery, publish_run
from tests.support.fake_upstream import Step
from tests.support.flows import submit_async, wait_for_end

pytestmark = pytest.mark.e2e


@pytest.fixture
def sdk(api_url, api_key, worker):
    return openai.OpenAI(base_url=f"{api_url}/v1", api_key=api_key, max_retries=0, timeout=60)


def test_openai_sdk_sync_b64_renders_the_requested_size(sdk):
    result = sdk.images.generate(
        model="local", prompt="a lighthouse", size="320x200", n=2, response_format="b64_json", output_format="png"
    )
    assert len(result.data) == 2
    images = [Image.open(io.BytesIO(base64.b64decode(item.b64_json))) for item in result.data]
    assert [(image.format, image.size) for image in images] == [("PNG", (320, 200))] * 2
    assert images[0].tobytes() != images[1].tobytes()  # index is part of what is drawn
    extra = result.model_extra
    assert extra["task_status"] == "succeed" and extra["task_id"]


def test_openai_sdk_sync_url_is_signed_and_needs_no_key(sdk):
    result = sdk.images.generate(
        model="local", prompt="a harbour", size="64x64", output_format="jpeg", response_format="url"
    )
    url = result.data[0].url
    image = httpx.get(url)  # no Authorization header
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(image.content)).size == (64, 64)
    tampered = url.replace("signature=", "signature=x")
    assert httpx.get(tampered).status_code == 404
    expired = url.split("?")[0] + "?expires=1000&" + url.split("&", 1)[1]
    assert httpx.get(expired).status_code == 404


def test_openai_sdk_against_an_openai_upstream_with_usage_and_revised_prompt(sdk, upstream, prompt):
    upstream.script(prompt, Step(revised_prompt="a red fox, revised", as_url=True))
    result = sdk.images.generate(model="fake-dalle", prompt=prompt, response_format="b64_json")
    assert result.data[0].revised_prompt == "a red fox, revised"
    assert Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).size == (16, 16)  # re-hosted URL
    assert result.usage.total_tokens == 100
    (call,) = upstream.calls_for(prompt)
    assert call.body["model"] == "dall-e-3"  # upstream_model
    assert call.authorization.startswith("Bearer sk-upstream-secret-")


def _sync_replies(api_url: str) -> dict[str, float]:
    """imagegate_sync_replies_total by source, summed over the API's processes."""
    text = httpx.get(f"{api_url}/metrics", timeout=10).text
    return {
        sample.labels["source"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "imagegate_sync_replies_total"
    }


@pytest.mark.parametrize(
    "fields",
    [{"model": "fake-dalle"}, {"model": "local", "n": 3, "size": "32x32"}],
    ids=["usage and revised prompt", "three images in order"],
)
def test_a_sync_reply_handed_over_by_the_worker_is_the_stored_task_s_reply(client, api_url, upstream, prompt, fields):
    """The worker hands a waiting b64_json request its reply; the same request replayed (its
    Idempotency-Key) is answered from the stored task: both must be the same reply."""
    upstream.script(prompt, Step(revised_prompt="revised, once", as_url=False))
    body = {"prompt": prompt, "response_format": "b64_json", **fields}
    headers = {"Idempotency-Key": f"handover-{prompt}"}
    before = _sync_replies(api_url)
    first = client.post("/v1/images/generations", json=body, headers=headers)
    assert first.status_code == 200, first.text
    between = _sync_replies(api_url)
    replayed = client.post("/v1/images/generations", json=body, headers=headers)
    assert replayed.status_code == 200 and replayed.headers["Idempotent-Replayed"] == "true"
    after = _sync_replies(api_url)

    assert between.get("handed_over", 0) - before.get("handed_over", 0) == 1
    assert after.get("database", 0) - between.get("database", 0) == 1
    assert first.json() == replayed.json()
    assert len(first.json()["data"]) == fields.get("n", 1)
    if fields["model"] == "fake-dalle":
        assert first.json()["usage"]["total_tokens"] == 100
        assert first.json()["data"][0]["revised_prompt"] == "revised, once"


def test_async_submit_then_poll_until_succeed(client, upstream, prompt):
    upstream.script(prompt, Step(delay_s=0.5))
    task_id = submit_async(client, model="fake-dalle", prompt=prompt, response_format="b64_json")
    seen = client.get(f"/v1/images/{task_id}").json()
    assert seen["task_status"] in ("pending", "running") and "data" not in seen and "error" not in seen
    body = wait_for_end(client, task_id)
    assert body["task_status"] == "succeed" and body["model"] == "fake-dalle" and body["attempts"] == 1
    assert body["task_id"] == task_id and isinstance(body["created"], int) and "error" not in body
    assert base64.b64decode(body["data"][0]["b64_json"]).startswith(b"\x89PNG")


def test_retries_after_two_upstream_500s_succeed_on_the_third_call(client, upstream, prompt):
    upstream.script(prompt, Step(status=500), Step(status=500))
    task_id = submit_async(client, model="fake-dalle", prompt=prompt, retries=2)
    body = wait_for_end(client, task_id)
    assert body["task_status"] == "succeed"
    assert body["attempts"] == 3
    assert len(upstream.calls_for(prompt)) == 3


def test_no_retries_fails_with_the_upstream_error(client, upstream, prompt):
    upstream.script(prompt, Step(status=500, message="upstream exploded"))
    task_id = submit_async(client, model="fake-dalle", prompt=prompt, retries=0)
    body = wait_for_end(client, task_id)
    assert body["task_status"] == "failed" and "data" not in body
    assert body["error"]["code"] == "upstream_error"
    assert body["error"]["message"] == "upstream exploded"
    assert body["error"]["details"]["upstream_status"] == 500
    assert len(upstream.calls_for(prompt)) == 1


def test_sync_failure_after_retries_answers_502_in_openai_shape(client, upstream, prompt):
    upstream.script(prompt, Step(status=503), Step(status=503))
    response = client.post("/v1/images/generations", json={"model": "fake-dalle", "prompt": prompt, "retries": 1})
    assert response.status_code == 502
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "upstream_error"
    assert len(upstream.calls_for(prompt)) == 2


def test_upstream_400_fails_after_one_call_and_sync_answers_400(client, upstream, prompt):
    upstream.script(prompt, Step(status=400, error_code="content_policy_violation", message="refused"))
    response = client.post("/v1/images/generations", json={"model": "fake-dalle", "prompt": prompt, "retries": 3})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "content_policy_violation"
    assert len(upstream.calls_for(prompt)) == 1


def test_retry_after_is_respected(client, upstream, prompt):
    upstream.script(prompt, Step(status=429, headers={"Retry-After": "2"}))
    task_id = submit_async(client, model="fake-dalle", prompt=prompt, retries=1)
    assert wait_for_end(client, task_id)["task_status"] == "succeed"
    first, second = upstream.calls_for(prompt)
    assert second.at - first.at >= 2.0


def test_a_message_delivered_twice_makes_one_upstream_call(client, upstream, prompt, settings):
    upstream.script(prompt, Step(delay_s=1.0))
    task_id = submit_async(client, model="fake-dalle", prompt=prompt)
    celery = make_celery(settings)
    for _ in range(2):  # the same (task, attempt) message, delivered again
        publish_run(celery, task_id, attempt=1)
    body = wait_for_end(client, task_id)
    time.sleep(1.0)  # let the duplicates be consumed too
    assert body["task_status"] == "succeed" and body["attempts"] == 1
    assert len(upstream.calls_for(prompt)) == 1
    assert client.get(f"/v1/images/{task_id}").json()["attempts"] == 1


def test_sync_wait_past_the_timeout_answers_202_and_the_task_goes_on(
    api_url, api_key, worker, env, upstream, prompt, run_dir
):
    from tests.support.processes import start_api, stop_process
    from tests.support.services import free_port

    port = free_port()
    short = env | {"IMAGEGATE_SYNC_TIMEOUT_S": "1"}
    process = start_api(short, run_dir / "api-short.log", port)
    try:
        base = f"http://127.0.0.1:{port}"
        upstream.script(prompt, Step(delay_s=3))
        headers = {"Authorization": f"Bearer {api_key}"}
        started = time.monotonic()
        response = httpx.post(
            f"{base}/v1/images/generations", headers=headers, timeout=30, json={"model": "fake-dalle", "prompt": prompt}
        )
        assert response.status_code == 202 and time.monotonic() - started < 2.9
        body = response.json()
        assert body["task_status"] in ("pending", "running")
        with httpx.Client(base_url=base, headers=headers) as http:
            assert wait_for_end(http, body["task_id"])["task_status"] == "succeed"
    finally:
        stop_process(process)


def test_another_keys_task_is_a_404_like_a_missing_one(client, api_url, other_key):
    task_id = submit_async(client, model="local", prompt="mine")
    other = httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {other_key}"})
    theirs = other.get(f"/v1/images/{task_id}")
    missing = other.get("/v1/images/00000000-0000-0000-0000-000000000000")
    malformed = other.get("/v1/images/not-a-uuid")
    assert theirs.status_code == missing.status_code == malformed.status_code == 404
    scrub = lambda response: response.text.replace(response.url.path.rsplit("/", 1)[1], "ID")  # noqa: E731
    assert scrub(theirs) == scrub(missing) == scrub(malformed)
    assert client.get(f"/v1/images/{task_id}").status_code == 200


def test_hundreds_of_synchronous_requests_wait_at_once_on_one_api_process(api_url, api_key, worker, upstream):
    import concurrent.futures

    # fake-backup: no short upstream timeout, so a loaded machine slows the answers but fails none.
    prompt = f"crowd {time.time()}"

    def one(index: int) -> int:
        response = httpx.post(
            f"{api_url}/v1/images/generations",
            timeout=120,
            headers={"Authorization": f"Bearer {api_key}"},
            json={"model": "fake-backup", "prompt": f"{prompt} {index}", "response_format": "url"},
        )
        return response.status_code

    for index in range(200):
        upstream.script(f"{prompt} {index}", Step(delay_s=1.5))
    with concurrent.futures.ThreadPoolExecutor(max_workers=200) as pool:
        statuses = list(pool.map(one, range(200)))
    assert statuses == [200] * 200


def test_upstream_secret_never_appears_in_responses(client, upstream, prompt, env):
    upstream.script(prompt, Step(status=401, message="bad key"))
    task_id = submit_async(client, model="fake-dalle", prompt=prompt)
    body = wait_for_end(client, task_id)
    assert body["error"]["code"] == "upstream_auth_failed"
    assert env["FAKE_UPSTREAM_KEY"] not in client.get(f"/v1/images/{task_id}").text
