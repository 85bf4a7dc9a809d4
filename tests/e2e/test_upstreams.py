"""Every kind of upstream through the real API, worker and Postgres: relay quirks, asynchronous
upstreams, fan-out, fallbacks, deadlines and re-hosting."""

from __future__ import annotations

import base64
import io
import time

import httpx
import pytest
from PIL import Image
from sqlalchemy import create_engine, text

from imagegate.app.queue import make_celery, publish_run
from tests.support.fake_upstream import Step
from tests.support.flows import submit_async, wait_for_end

pytestmark = pytest.mark.e2e


def test_grok_relay_gets_array_params_and_its_usage_is_returned(client, upstream, prompt):
    upstream.script(
        prompt, Step(as_url=True, usage={"generated_images": 2, "output_tokens": 16384, "total_tokens": 16384})
    )
    response = client.post(
        "/v1/images/generations",
        json={
            "model": "fake-grok",
            "prompt": prompt,
            "size": "960x960",
            "n": 2,
            "aspect_ratio": "1:1",
            "quality": "low",
            "resolution": "1k",
            "response_format": "b64_json",
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["data"]) == 2 and body["usage"]["generated_images"] == 2
    (call,) = upstream.calls_for(prompt)
    assert call.body["model"] == "grok-3-image"
    assert call.body["aspect_ratio"] == [None, "1:1"]
    assert call.body["quality"] == [None, "low"] and call.body["resolution"] == [None, "1k"]
    assert call.body["size"] == "960x960" and call.body["n"] == 2  # not wrapped


def test_asynchronous_upstream_is_submitted_once_and_polled(client, upstream, prompt):
    upstream.script(prompt, Step(pending_polls=2))
    body = client.post("/v1/images/generations", json={"model": "fake-async", "prompt": prompt, "n": 2}).json()
    assert body["task_status"] == "succeed" and len(body["data"]) == 2
    assert len(upstream.calls_for(prompt, "submit")) == 1
    assert len(upstream.calls_for(prompt, "poll")) == 3
    submit = upstream.calls_for(prompt, "submit")[0]
    assert submit.body["async"] is True


def test_a_new_attempt_resumes_polling_instead_of_submitting_again(client, upstream, prompt, settings, database_url):
    upstream.script(prompt, Step(pending_polls=10_000))
    task_id = submit_async(client, model="fake-async", prompt=prompt)
    engine = create_engine(database_url)
    query = text("SELECT upstream_task_id, attempts FROM tasks WHERE id = :id")
    row = None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (row and row.upstream_task_id):
        time.sleep(0.1)
        with engine.connect() as connection:
            row = connection.execute(query, {"id": task_id}).one()
    assert row.upstream_task_id
    # The worker is presumed dead: its attempt is handed back, as a sweeper would, keeping the
    # upstream task id; a new attempt is published.
    with engine.begin() as connection:
        connection.execute(text("UPDATE tasks SET status = 'pending' WHERE id = :id"), {"id": task_id})
    publish_run(make_celery(settings), task_id, row.attempts + 1)
    upstream.finish_async(prompt)
    body = wait_for_end(client, task_id)
    assert body["task_status"] == "succeed" and body["attempts"] == 2
    assert len(upstream.calls_for(prompt, "submit")) == 1


def test_an_asynchronous_upstream_failure_is_retried_with_a_new_submission(client, upstream, prompt):
    upstream.script(prompt, Step(final_status="failed", message="gpu on fire"), Step())
    task_id = submit_async(client, model="fake-async", prompt=prompt, retries=1)
    body = wait_for_end(client, task_id)
    assert body["task_status"] == "succeed" and body["attempts"] == 2
    assert len(upstream.calls_for(prompt, "submit")) == 2
    assert body["attempt_log"][0]["error_code"] == "upstream_error"


def test_fan_out_makes_concurrent_calls_and_retries_only_the_one_that_failed(client, upstream, prompt):
    upstream.script(prompt, Step(delay_s=0.5), Step(status=500, delay_s=0.5), Step(delay_s=0.5), Step(delay_s=0.5))
    started = time.monotonic()
    body = client.post(
        "/v1/images/generations",
        json={"model": "fake-one", "prompt": prompt, "n": 4, "retries": 1, "response_format": "b64_json"},
    ).json()
    assert body["task_status"] == "succeed", body
    assert len(body["data"]) == 4
    assert all(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).format == "PNG" for item in body["data"])
    calls = upstream.calls_for(prompt)
    assert len(calls) == 5 and all(call.body["n"] == 1 for call in calls)
    first_four = sorted(call.at for call in calls)[:4]
    assert first_four[-1] - first_four[0] < 0.4  # made together, not one after another
    log = client.get(f"/v1/images/{body['task_id']}").json()["attempt_log"]
    assert [(entry["number"], entry.get("error_code")) for entry in log].count((1, "upstream_error")) == 1
    assert [entry["number"] for entry in log].count(1) == 4
    assert [entry["number"] for entry in log].count(2) == 1
    assert time.monotonic() - started < 30


def test_fallback_is_taken_after_a_503(client, upstream, prompt):
    upstream.script(prompt, Step(status=503))
    body = wait_for_end(client, submit_async(client, model="fake-primary", prompt=prompt))
    assert body["task_status"] == "succeed" and body["model"] == "fake-primary"
    assert [entry["model"] for entry in body["attempt_log"]] == ["fake-primary", "fake-backup"]
    assert [call.body["model"] for call in upstream.calls_for(prompt)] == ["primary-model", "backup-model"]


def test_fallback_is_not_taken_after_a_400(client, upstream, prompt):
    upstream.script(prompt, Step(status=400, message="bad size"))
    body = wait_for_end(client, submit_async(client, model="fake-primary", prompt=prompt))
    assert body["task_status"] == "failed" and body["error"]["code"] == "upstream_rejected"
    assert [call.body["model"] for call in upstream.calls_for(prompt)] == ["primary-model"]


def test_a_slow_trickling_upstream_is_cut_off_at_the_model_deadline(client, upstream, prompt):
    upstream.script(prompt, Step(trickle=True))
    task_id = submit_async(client, model="fake-one", prompt=prompt)  # timeout_s = 7
    body = wait_for_end(client, task_id, timeout_s=30)
    assert body["task_status"] == "failed" and body["error"]["code"] == "upstream_timeout"
    (entry,) = body["attempt_log"]
    from datetime import datetime

    took = (datetime.fromisoformat(entry["ended_at"]) - datetime.fromisoformat(entry["started_at"])).total_seconds()
    assert 7 <= took < 9


def test_b64_upstream_is_served_as_a_url_on_the_gateway(client, upstream, prompt, api_url):
    upstream.script(prompt, Step())  # answers b64_json
    body = client.post(
        "/v1/images/generations", json={"model": "fake-dalle", "prompt": prompt, "response_format": "url"}
    ).json()
    url = body["data"][0]["url"]
    assert url.startswith(api_url + "/files/images/")
    assert httpx.get(url).content.startswith(b"\x89PNG")


def test_image_urls_on_the_upstreams_own_private_origin_are_downloaded(client, upstream, prompt):
    # fake-strict allows no private downloads, but the URL is on its own base_url's origin (other
    # private origins are refused: tests/test_outbound.py).
    upstream.script(prompt, Step(as_url=True))
    response = client.post(
        "/v1/images/generations", json={"model": "fake-strict", "prompt": prompt, "response_format": "url"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["task_status"] == "succeed"


def test_chat_model_image_from_the_seed_reply_is_rehosted(client, chat_upstream, prompt):
    from tests.support.fake_chat import ChatStep

    chat_upstream.script(prompt, ChatStep(style="geekai"))
    body = client.post(
        "/v1/images/generations", json={"model": "fake-chat", "prompt": prompt, "response_format": "b64_json"}
    ).json()
    assert body["task_status"] == "succeed" and len(body["data"]) == 1
    assert Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))).format == "PNG"
    (call,) = chat_upstream.calls_for(prompt)
    assert call.body["model"] == "gemini-2.5-flash-image" and call.body["image_generation"] is True
    assert call.body["messages"][0]["role"] == "system"


def test_chat_model_edit_fans_out_and_retries_a_reply_without_an_image(client, chat_upstream, prompt):
    from tests.support.fake_chat import ChatStep

    chat_upstream.script(prompt, ChatStep(style="no_image"), ChatStep(style="openrouter"))
    task_id = submit_async(
        client, model="fake-chat", prompt=prompt, n=2, retries=1, image="https://example.com/cat.png"
    )
    body = wait_for_end(client, task_id)
    assert body["task_status"] == "succeed" and len(body["data"]) == 2
    calls = chat_upstream.calls_for(prompt)
    assert len(calls) == 3  # two concurrent calls, one answered text only and was made again
    parts = calls[0].body["messages"][-1]["content"]
    assert {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}} in parts
    assert [entry.get("error_code") for entry in body["attempt_log"]].count("no_image_in_reply") == 1


@pytest.mark.parametrize("status, code", [(400, "upstream_rejected"), (500, "upstream_error")])
def test_an_upstream_echoing_the_authorization_header_leaks_no_key(client, upstream, prompt, env, status, code):
    key = env["FAKE_UPSTREAM_KEY"]
    echo = f"Authorization: Bearer {key}"  # what the worker sends, echoed back in the error body
    upstream.script(
        prompt,
        Step(
            status=status,
            message=f"bad request; headers were {{{echo!r}}} (key {key})",
            error_code=f"invalid_key_{key}",
        ),
    )
    body = wait_for_end(client, submit_async(client, model="fake-dalle", prompt=prompt))
    (call,) = upstream.calls_for(prompt)
    assert call.authorization == f"Bearer {key}"  # so the body above is a faithful echo
    assert body["task_status"] == "failed" and body["error"]["code"] == code
    assert "bad request; headers were" in body["error"]["message"]  # the rest of the text is kept
    stored = client.get(f"/v1/images/{body['task_id']}").text
    assert key not in stored and key[:12] not in stored and "[redacted]" in stored
