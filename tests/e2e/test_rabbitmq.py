"""End to end over RabbitMQ: a real API server and Celery worker with IMAGEGATE_BROKER_URL=amqp://
(a vhost of this run's own) and IMAGEGATE_REDIS_URL for the wake-ups, a database of their own, the
shared fake upstream. The flows users run: sync, async, retries, batches, webhooks, and a single
request beside a batch."""

from __future__ import annotations

import base64
import json
import time
import uuid

import httpx
import pytest
import redis
from standardwebhooks import Webhook

from imagegate.app.queue import BATCH_QUEUE, QUEUE, WEBHOOK_QUEUE
from imagegate.app.rabbitmq import AmqpBroker
from tests.support.databases import drop_database, fresh_database
from tests.support.fake_receiver import Receiver
from tests.support.fake_upstream import Step
from tests.support.flows import submit_async, wait_for_end
from tests.support.processes import create_key, run_cli, start_api, start_worker, stop_process
from tests.support.services import free_port, wait_until

pytestmark = pytest.mark.e2e

DELAYED = [f"celery_delayed_{level}" for level in range(28)]  # native delayed delivery's queues


@pytest.fixture(scope="module")
def rabbit_env(env, postgres_url, amqp_url, redis_dbs):
    database = fresh_database(postgres_url)
    port = free_port()
    environment = env | {
        "IMAGEGATE_DATABASE_URL": database,
        "IMAGEGATE_BROKER_URL": amqp_url,
        "IMAGEGATE_REDIS_URL": redis_dbs[0],
        "IMAGEGATE_PUBLIC_URL": f"http://127.0.0.1:{port}",
    }
    result = run_cli(["db", "upgrade"], environment)
    assert result.returncode == 0, result.stderr
    yield environment
    drop_database(database)


@pytest.fixture(scope="module")
def rabbit_processes(rabbit_env, run_dir):
    worker = start_worker(rabbit_env, run_dir / "rabbit-worker.log", concurrency=20)
    port = int(rabbit_env["IMAGEGATE_PUBLIC_URL"].rsplit(":", 1)[1])
    api = start_api(rabbit_env, run_dir / "rabbit-api.log", port)
    yield rabbit_env["IMAGEGATE_PUBLIC_URL"], worker
    stop_process(api)
    stop_process(worker)


@pytest.fixture(scope="module")
def rabbit_key(rabbit_env):
    return create_key(rabbit_env, "rabbit")


@pytest.fixture
def rabbit(rabbit_processes, rabbit_key):
    url, _ = rabbit_processes
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {rabbit_key}"}, timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def receiver():
    server = Receiver().start()
    yield server
    server.stop()


def test_a_sync_request_is_answered_and_its_waiter_woken_through_redis(rabbit, redis_dbs):
    """The task message goes through RabbitMQ; the worker announces the end on Redis, where the
    API's listener wakes the waiting request."""
    client = redis.Redis.from_url(redis_dbs[0])
    listener = client.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(f"imagegate:{client.connection_pool.connection_kwargs['db']}:task-ended")
    response = rabbit.post(
        "/v1/images/generations",
        json={"model": "local", "prompt": "a hare", "size": "32x32", "response_format": "b64_json"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["task_status"] == "succeed" and base64.b64decode(body["data"][0]["b64_json"])
    announced, deadline = [], time.monotonic() + 5
    while body["task_id"] not in announced and time.monotonic() < deadline:
        if message := listener.get_message(timeout=0.2):
            announced.append(message["data"].decode())
    assert body["task_id"] in announced
    listener.close()


def test_async_retries_after_two_500s_and_succeeds(rabbit, upstream, prompt):
    upstream.script(prompt, Step(status=500), Step(status=500))
    task_id = submit_async(rabbit, model="fake-dalle", prompt=prompt, retries=2, response_format="b64_json")
    body = wait_for_end(rabbit, task_id)
    assert body["task_status"] == "succeed" and body["attempts"] == 3
    assert len(upstream.calls_for(prompt)) == 3


def test_a_retry_countdown_waits_in_rabbitmq_not_in_the_worker(rabbit, upstream, prompt, amqp_url):
    """Retry-After: 3 puts the next attempt in native delayed delivery's queues, where RabbitMQ holds
    it (no worker holds it unacknowledged), and it runs no sooner than asked."""
    upstream.script(prompt, Step(status=429, headers={"Retry-After": "3"}))
    task_id = submit_async(rabbit, model="fake-dalle", prompt=prompt, retries=1)
    broker = AmqpBroker(amqp_url)
    try:
        wait_until(lambda: upstream.calls_for(prompt), 20, "the first call")
        wait_until(lambda: sum(broker.queued(DELAYED).values()) >= 1, 3, "the retry in a delayed queue", 0.05)
    finally:
        broker.close()
    assert wait_for_end(rabbit, task_id)["task_status"] == "succeed"
    first, second = upstream.calls_for(prompt)
    assert second.at - first.at >= 3.0


def test_a_batch_runs_and_its_webhook_is_delivered(rabbit, receiver):
    url = receiver.url()
    lines = [
        {"custom_id": f"t{index:03d}", "body": {"model": "local", "prompt": f"tile {index}"}} for index in range(200)
    ]
    created = rabbit.post("/v1/images/batches", json={"requests": lines, "callback_url": url})
    assert created.status_code == 202, created.text
    batch_id = created.json()["id"]
    wait_until(
        lambda: rabbit.get(f"/v1/images/batches/{batch_id}").json()["status"] == "completed",
        90,
        "the batch to complete",
        interval_s=0.5,
    )
    results = [json.loads(line) for line in rabbit.get(f"/v1/images/batches/{batch_id}/results").text.splitlines()]
    assert [result["custom_id"] for result in results] == [line["custom_id"] for line in lines]
    assert all(result["task_status"] == "succeed" for result in results)
    wait_until(lambda: receiver.hits(url), 30, "the batch webhook")
    (hit,) = receiver.hits(url)
    assert hit.headers["webhook-id"].startswith("msg_")
    assert json.loads(hit.body)["type"] == "image.batch.completed"


def test_a_failing_receiver_gets_its_retries_through_rabbitmq_countdowns(rabbit, rabbit_env, receiver):
    output = run_cli(["keys", "create", "--name", f"hooks-{uuid.uuid4().hex[:6]}"], rabbit_env).stdout
    key, secret = output.strip().splitlines()[-1], next(w for w in output.split() if w.startswith("whsec_"))
    url = receiver.url(500, 500)
    with httpx.Client(base_url=str(rabbit.base_url), headers={"Authorization": f"Bearer {key}"}, timeout=30) as own:
        task_id = submit_async(own, model="local", prompt="hooked", size="16x16", callback_url=url)
    wait_until(lambda: len(receiver.hits(url)) >= 3, 30, "three deliveries (schedule 1,1,1)")
    hits = receiver.hits(url)
    assert len({hit.headers["webhook-id"] for hit in hits}) == 1
    event = Webhook(secret).verify(hits[-1].body, {name.lower(): value for name, value in hits[-1].headers.items()})
    assert event["type"] == "image.task.succeed" and event["data"]["task_id"] == task_id
    assert hits[1].at - hits[0].at >= 1.0 and hits[2].at - hits[1].at >= 1.0


def test_a_single_request_is_not_stuck_behind_a_batch(rabbit, rabbit_processes, upstream):
    """The worker (20 slots) takes from the interactive queue beside the batch queue: a request
    from another client is answered while a 200-task batch (10 s of work) is far from done."""
    url, _ = rabbit_processes
    prompts = [f"slow batch {index} {uuid.uuid4().hex}" for index in range(200)]
    for prompt in prompts:
        upstream.script(prompt, Step(delay_s=1.0))
    batch = rabbit.post(
        "/v1/images/batches",
        json={
            "requests": [
                {"custom_id": str(i), "body": {"model": "fake-dalle", "prompt": p}} for i, p in enumerate(prompts)
            ]
        },
    ).json()
    wait_until(lambda: sum(len(upstream.calls_for(p)) for p in prompts) >= 20, 30, "the batch to be running")
    single = f"single {uuid.uuid4().hex}"
    upstream.script(single, Step(delay_s=1.0))
    started = time.monotonic()
    response = rabbit.post("/v1/images/generations", json={"model": "fake-dalle", "prompt": single})
    waited = time.monotonic() - started
    counts = rabbit.get(f"/v1/images/batches/{batch['id']}").json()["counts"]
    print(f"a single request beside a 200-task batch over RabbitMQ answered in {waited:.1f} s; {counts}")
    assert response.status_code == 200, response.text
    assert counts.get("pending", 0) > 0  # answered while the batch was far from done
    rabbit.post(f"/v1/images/batches/{batch['id']}/cancel")


def test_readyz_and_the_queues_rabbitmq_holds(rabbit, rabbit_processes, rabbitmq, amqp_url):
    url, worker = rabbit_processes
    ready = httpx.get(f"{url}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["broker"] == "ok" and ready.json()["workers"] >= 1
    types = rabbitmq.queue_types(amqp_url)
    ours = {name: kind for name, kind in types.items() if name in (QUEUE, BATCH_QUEUE, WEBHOOK_QUEUE, *DELAYED)}
    assert set(ours) == {QUEUE, BATCH_QUEUE, WEBHOOK_QUEUE, *DELAYED} and set(ours.values()) == {"quorum"}
    assert worker.poll() is None  # its consumer watchdog found nothing wrong all along


def test_the_cli_says_in_one_line_what_is_wrong_with_a_rabbitmq_setup(rabbit_env):
    without_redis = {name: value for name, value in rabbit_env.items() if name != "IMAGEGATE_REDIS_URL"}
    result = run_cli(["sweeper", "--once"], without_redis)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "IMAGEGATE_REDIS_URL" in result.stderr and len(result.stderr.strip().splitlines()) == 1

    nobody = rabbit_env | {"IMAGEGATE_BROKER_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}/"}
    result = run_cli(["sweeper", "--once"], nobody)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "the broker does not answer" in result.stderr and len(result.stderr.strip().splitlines()) == 1
