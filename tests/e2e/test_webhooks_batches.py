"""Webhooks, batches and Idempotency-Key through the real API server, worker and Postgres; webhook
signatures checked with the standardwebhooks library."""

from __future__ import annotations

import concurrent.futures
import json
import re
import time
import uuid
from dataclasses import dataclass, field

import httpx
import pytest
from standardwebhooks import Webhook

from tests.support.fake_receiver import Hit, Receiver
from tests.support.fake_upstream import Step
from tests.support.flows import submit_async, wait_for_end
from tests.support.processes import run_cli
from tests.support.services import wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def receiver():
    server = Receiver().start()
    yield server
    server.stop()


@dataclass
class KeyWithSecret:
    key: str
    secret: str
    name: str = field(default_factory=lambda: f"hooks-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def hooked(env, migrated):
    name = f"hooks-{uuid.uuid4().hex[:8]}"
    output = run_cli(["keys", "create", "--name", name], env).stdout
    secret = re.search(r"(whsec_\S+)", output).group(1)
    return KeyWithSecret(output.strip().splitlines()[-1], secret, name)


@pytest.fixture
def hook_client(api_url, hooked, worker):
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {hooked.key}"}, timeout=60) as http:
        yield http


def verified(hit: Hit, secret: str) -> dict:
    return Webhook(secret).verify(hit.body, {name.lower(): value for name, value in hit.headers.items()})


def test_a_task_end_is_posted_signed_with_image_urls(hook_client, hooked, receiver):
    url = receiver.url()
    task_id = submit_async(
        hook_client, model="local", prompt="a webhook", size="32x32", response_format="b64_json", callback_url=url
    )
    wait_until(lambda: receiver.hits(url), 30, "the webhook")
    (hit,) = receiver.hits(url)
    event = verified(hit, hooked.secret)
    assert event["type"] == "image.task.succeed" and event["timestamp"]
    assert event["data"]["task_id"] == task_id and event["data"]["task_status"] == "succeed"
    assert "b64_json" not in hit.body.decode() and httpx.get(event["data"]["data"][0]["url"]).status_code == 200
    assert hit.headers["webhook-id"].startswith("msg_")


def recorded_deliveries(client, task_id: str, count: int, *, timeout_s: float) -> list[dict]:
    """The task's webhook deliveries, once `count` are recorded."""

    def recorded():
        deliveries = client.get("/v1/webhooks/deliveries", params={"task_id": task_id}).json()["data"]
        return len(deliveries) == count and deliveries

    return wait_until(recorded, timeout_s, f"{count} recorded deliveries")


def test_a_failing_receiver_gets_retries_with_one_webhook_id(hook_client, hooked, receiver, upstream, prompt):
    url = receiver.url(500, 500)
    upstream.script(prompt, Step(status=400, message="refused"))
    task_id = submit_async(hook_client, model="fake-dalle", prompt=prompt, callback_url=url)
    wait_until(lambda: len(receiver.hits(url)) >= 3, 30, "three deliveries")
    time.sleep(1.5)
    hits = receiver.hits(url)
    assert len(hits) == 3 and len({hit.headers["webhook-id"] for hit in hits}) == 1
    assert verified(hits[-1], hooked.secret)["type"] == "image.task.failed"
    deliveries = recorded_deliveries(hook_client, task_id, 3, timeout_s=10)
    assert sorted((d["attempt"], d["status_code"]) for d in deliveries) == [(1, 500), (2, 500), (3, 200)]
    assert all(d["latency_ms"] >= 0 and d["event_id"] == hits[0].headers["webhook-id"] for d in deliveries)


def test_a_receiver_failing_every_attempt_ends_its_schedule_cleanly(
    hook_client, hooked, receiver, upstream, prompt, worker, run_dir
):
    url = receiver.url(*[500] * 10)
    upstream.script(prompt, Step(status=400, message="refused"))
    task_id = submit_async(hook_client, model="fake-dalle", prompt=prompt, callback_url=url)
    deliveries = recorded_deliveries(hook_client, task_id, 4, timeout_s=30)  # the first, then 3 retries
    assert sorted((d["attempt"], d["status_code"]) for d in deliveries) == [(1, 500), (2, 500), (3, 500), (4, 500)]
    time.sleep(1.5)  # no fifth attempt, and the last one's end was written without an error
    assert len(receiver.hits(url)) == 4
    assert "webhook delivery failed" not in (run_dir / "worker.log").read_text()


def test_410_disables_the_url_and_redeliver_sends_again(hook_client, hooked, receiver):
    url = receiver.url(410)
    first = submit_async(hook_client, model="local", prompt="gone", size="16x16", callback_url=url)
    wait_until(lambda: receiver.hits(url), 30, "the first delivery")
    second = submit_async(hook_client, model="local", prompt="gone again", size="16x16", callback_url=url)
    wait_for_end(hook_client, second)
    time.sleep(2)
    assert len(receiver.hits(url)) == 1  # the second event never went out
    (delivery,) = hook_client.get("/v1/webhooks/deliveries", params={"task_id": first}).json()["data"]
    assert delivery["status_code"] == 410
    response = hook_client.post(f"/v1/webhooks/deliveries/{delivery['id']}/redeliver")
    assert response.status_code == 202
    wait_until(lambda: len(receiver.hits(url)) == 2, 30, "the redelivery")
    assert receiver.hits(url)[1].headers["webhook-id"] == receiver.hits(url)[0].headers["webhook-id"]


def test_a_rotated_secret_and_the_previous_one_both_sign(hook_client, hooked, receiver, env):
    new_secret = run_cli(["keys", "rotate-webhook-secret", "--name", hooked.name], env).stdout.strip()
    assert new_secret.startswith("whsec_") and new_secret != hooked.secret
    url = receiver.url()
    submit_async(hook_client, model="local", prompt="rotation", size="16x16", callback_url=url)
    wait_until(lambda: receiver.hits(url), 30, "the webhook")
    (hit,) = receiver.hits(url)
    assert verified(hit, new_secret) == verified(hit, hooked.secret)
    assert len(hit.headers["webhook-signature"].split()) == 2


UNSAFE = [
    "http://127.0.0.1/",
    "http://[::1]/",
    "http://169.254.169.254/",
    "http://10.0.0.1/",
    "http://2130706433/",
    "http://[::ffff:127.0.0.1]/",
    "http://localhost/",
    "ftp://example.com/",
]


@pytest.mark.parametrize("url", UNSAFE)
def test_private_callback_urls_are_refused_at_intake(settings, redis_dbs, api_key, count_tasks, url):
    from imagegate.app.web import create_app

    strict = settings.model_copy(update={"webhook_allow_private": False, "broker_url": redis_dbs[1]})
    client = create_app(strict).test_client()
    before = count_tasks()
    response = client.post(
        "/v1/images/generations",
        headers={"Authorization": f"Bearer {api_key}"},
        json={"prompt": "x", "async": True, "callback_url": url},
    )
    assert response.status_code == 400
    assert response.get_json()["error"]["param"] == "callback_url"
    assert count_tasks() == before


# -- batches -------------------------------------------------------------------------------------


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def test_a_batch_of_1000_runs_through_the_workers_and_reports_in_order(hook_client, hooked, receiver):
    url = receiver.url()
    lines = [
        {"custom_id": f"img-{index:04d}", "body": {"model": "local", "prompt": f"tile {index}", "size": "16x16"}}
        for index in range(1000)
    ]
    response = hook_client.post(
        "/v1/images/batches", content=jsonl(lines), headers={"Content-Type": "application/jsonl"}
    )
    assert response.status_code == 202, response.text
    batch = response.json()
    assert batch["total"] == 1000 and batch["status"] == "in_progress"
    hook_client.post("/v1/images/batches", json={"requests": lines[:1], "callback_url": url})  # a tiny second one
    wait_until(
        lambda: hook_client.get(f"/v1/images/batches/{batch['id']}").json()["status"] == "completed",
        120,
        "the batch to complete",
        interval_s=0.5,
    )
    done = hook_client.get(f"/v1/images/batches/{batch['id']}").json()
    assert done["counts"]["succeed"] == 1000 and done["finished"] >= done["created"]
    results = [
        json.loads(line) for line in hook_client.get(f"/v1/images/batches/{batch['id']}/results").text.splitlines()
    ]
    assert [result["custom_id"] for result in results] == [line["custom_id"] for line in lines]
    assert all(result["task_status"] == "succeed" and result["data"][0]["url"] for result in results)
    wait_until(lambda: receiver.hits(url), 30, "the batch webhook")
    event = verified(receiver.hits(url)[0], hooked.secret)
    assert event["type"] == "image.batch.completed" and event["data"]["counts"]["succeed"] == 1


def test_a_batch_with_bad_lines_is_refused_whole_naming_each(hook_client, count_tasks):
    before = count_tasks()
    body = b"\n".join(
        [
            json.dumps({"custom_id": "a", "body": {"prompt": "ok"}}).encode(),
            json.dumps({"custom_id": "a", "body": {"prompt": "same id"}}).encode(),
            b"{not json",
            json.dumps({"custom_id": "c", "body": {"prompt": "x", "n": 99}}).encode(),
            json.dumps({"custom_id": "d", "body": {"prompt": "x", "model": "nope"}}).encode(),
        ]
    )
    response = hook_client.post("/v1/images/batches", content=body, headers={"Content-Type": "application/jsonl"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_batch"
    assert [(line["line"], line["param"]) for line in error["lines"]] == [
        (2, "custom_id"),
        (3, None),
        (4, "body.n"),
        (5, "body.model"),
    ]
    assert count_tasks() == before


def test_a_batch_does_not_stall_another_keys_request(hook_client, api_url, other_key, upstream):
    prompts = [f"slow batch {index} {uuid.uuid4().hex}" for index in range(400)]
    for prompt in prompts:
        upstream.script(prompt, Step(delay_s=1.0))
    batch = hook_client.post(
        "/v1/images/batches",
        json={
            "requests": [
                {"custom_id": str(index), "body": {"model": "fake-dalle", "prompt": prompt}}
                for index, prompt in enumerate(prompts)
            ]
        },
    ).json()
    wait_until(lambda: sum(len(upstream.calls_for(p)) for p in prompts[:200]) >= 50, 30, "the batch to be running")
    single = f"single {uuid.uuid4().hex}"
    upstream.script(single, Step(delay_s=1.0))
    started = time.monotonic()
    response = httpx.post(
        f"{api_url}/v1/images/generations",
        timeout=120,
        headers={"Authorization": f"Bearer {other_key}"},
        json={"model": "fake-dalle", "prompt": single},
    )
    waited = time.monotonic() - started
    remaining = hook_client.get(f"/v1/images/batches/{batch['id']}").json()["counts"]
    print(
        f"a single request behind a 400-task batch answered in {waited:.1f} s; batch still had "
        f"{remaining.get('pending', 0) + remaining.get('running', 0)} tasks to go"
    )
    assert response.status_code == 200
    assert remaining.get("pending", 0) > 0  # answered while the batch was far from done
    hook_client.post(f"/v1/images/batches/{batch['id']}/cancel")


def test_a_10000_request_batch_is_accepted_in_one_go(app_client, api_key, redis_dbs):
    import redis as redis_client

    lines = [{"custom_id": f"n{index}", "body": {"model": "local", "prompt": f"p{index}"}} for index in range(10_000)]
    started = time.monotonic()
    response = app_client.post(
        "/v1/images/batches",
        data=jsonl(lines),
        content_type="application/jsonl",
        headers={"Authorization": f"Bearer {api_key}"},
    )
    accepted_in = time.monotonic() - started
    assert response.status_code == 202 and response.get_json()["total"] == 10_000
    queue = redis_client.Redis.from_url(redis_dbs[1])
    wait_until(lambda: queue.llen("imagegate.batch") == 10_000, 60, "10 000 messages published")
    print(f"10 000-request batch accepted in {accepted_in:.2f} s; published in {time.monotonic() - started:.2f} s")
    queue.delete("imagegate.batch")


# -- Idempotency-Key ----------------------------------------------------------------------------


def test_twenty_concurrent_posts_with_one_idempotency_key_make_one_task(hook_client, api_url, hooked, count_tasks):
    key = f"idem-{uuid.uuid4().hex}"
    body = {"model": "local", "prompt": f"once {key}", "size": "16x16", "async": True}
    before = count_tasks()

    def post(_):
        return httpx.post(
            f"{api_url}/v1/images/generations",
            json=body,
            timeout=30,
            headers={"Authorization": f"Bearer {hooked.key}", "Idempotency-Key": key},
        )

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(post, range(20)))
    assert {response.status_code for response in responses} == {202}
    assert len({response.text for response in responses}) == 1  # the same response, byte for byte
    assert count_tasks() == before + 1
    other = httpx.post(
        f"{api_url}/v1/images/generations",
        json=body | {"prompt": "something else"},
        timeout=30,
        headers={"Authorization": f"Bearer {hooked.key}", "Idempotency-Key": key},
    )
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"


def test_an_idempotent_batch_is_the_same_batch(hook_client):
    body = {"requests": [{"custom_id": "x", "body": {"model": "local", "prompt": "idem batch"}}]}
    headers = {"Idempotency-Key": f"batch-{uuid.uuid4().hex}"}
    first = hook_client.post("/v1/images/batches", json=body, headers=headers)
    again = hook_client.post("/v1/images/batches", json=body, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"] and again.headers["Idempotent-Replayed"] == "true"


def test_a_line_separator_inside_a_json_string_does_not_split_the_line(hook_client):
    line = json.dumps(
        {"custom_id": "sep", "body": {"model": "local", "prompt": "a\u2028b\u0085c", "size": "16x16"}},
        ensure_ascii=False,
    )
    response = hook_client.post(
        "/v1/images/batches", content=(line + "\n").encode(), headers={"Content-Type": "application/jsonl"}
    )
    assert response.status_code == 202 and response.json()["total"] == 1
