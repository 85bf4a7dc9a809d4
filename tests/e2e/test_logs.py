"""The logs of a real API server, worker and sweeper: JSON lines carrying the task's context, and none
of the secrets a flow handles (the API key, the upstream key, the webhook secret, image URL signatures)."""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
import uuid
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import redis

from imagegate.app.queue import QUEUE, make_celery
from tests.support.fake_http import JsonHandler, ScriptedServer
from tests.support.fake_upstream import Step
from tests.support.flows import submit_async, wait_for_end
from tests.support.processes import run_cli, start_process, start_worker, stop_process
from tests.support.services import free_port, http_ok, wait_until

pytestmark = pytest.mark.e2e

FIELDS = {"timestamp", "level", "logger", "event", "process"}


class Receiver(ScriptedServer):
    """A webhook endpoint that answers 200 and records each delivery's path."""

    default_step = int

    def handler_class(self):
        receiver = self

        class Handler(JsonHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.log(self.path)
                self.send(200, b"ok", "text/plain")

        return Handler


@pytest.fixture
def receiver():
    server = Receiver().start()
    yield server
    server.stop()


def _json_lines(text: str) -> list[dict]:
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line parses
    for line in lines:
        assert FIELDS <= line.keys(), line
    return lines


def test_a_flow_logs_json_lines_with_its_context_and_no_secret(
    tmp_path, env, own_database, own_redis, upstream, receiver, prompt
):
    port = free_port()
    broker_url = f"{own_redis.url}/0"
    upstream_key = "plainUpstreamKey" + secrets.token_hex(12)  # no credential shape: redacted as configured
    ours = env | {
        "IMAGEGATE_DATABASE_URL": own_database,
        "IMAGEGATE_BROKER_URL": broker_url,
        "IMAGEGATE_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "IMAGEGATE_LOG_FORMAT": "json",
        "IMAGEGATE_LOG_LEVEL": "DEBUG",  # every line a process has, the chattiest included
        "IMAGEGATE_REPUBLISH_AFTER_S": "1",
        "IMAGEGATE_SWEEP_INTERVAL_S": "0.5",
        "FAKE_UPSTREAM_KEY": upstream_key,
    }
    created = run_cli(["keys", "create", "--name", "logs"], ours)
    assert created.returncode == 0, created.stderr
    api_key = created.stdout.strip().splitlines()[-1]
    webhook_secret = re.search(r"(whsec_\S+)", created.stdout).group(1)
    logs = {name: tmp_path / f"{name}.log" for name in ("api", "worker", "sweeper")}
    processes = [
        start_process(["api", "--port", str(port), "--workers", "1"], ours, logs["api"]),
        start_process(["sweeper"], ours, logs["sweeper"]),
    ]
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), 60, "the API server")
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {api_key}"}, timeout=60
        ) as http:
            request_id = f"logs-test-{uuid.uuid4().hex}"
            hook = f"http://127.0.0.1:{receiver.port}/hook"
            accepted = http.post(
                "/v1/images/generations",
                headers={"X-Request-Id": request_id},
                json={"model": "local", "prompt": prompt, "size": "64x64", "async": True, "callback_url": hook},
            )
            assert accepted.status_code == 202 and accepted.headers["x-request-id"] == request_id
            task_id = accepted.json()["task_id"]
            made = http.get(f"/v1/images/{task_id}", headers={"X-Request-Id": "x" * 201}).headers["x-request-id"]
            assert made != "x" * 201 and 0 < len(made) <= 200

            # The broker loses the message; the sweeper sends it again, and the worker started now runs it.
            redis.Redis.from_url(broker_url).delete(QUEUE)
            wait_until(lambda: "republished=1" in logs["sweeper"].read_text(), 30, "the sweeper to republish")
            processes.append(start_worker(ours, logs["worker"]))
            done = wait_for_end(http, task_id)
            assert done["task_status"] == "succeed", done
            image_url = done["data"][0]["url"]
            signature = parse_qs(urlsplit(image_url).query)["signature"][0]
            assert httpx.get(image_url).status_code == 200  # a signed URL, fetched through the API
            wait_until(lambda: receiver.calls, 30, "the webhook")

            # An upstream that echoes the operator's key in its error.
            upstream.script(prompt, Step(401, "invalid_api_key", f"Incorrect API key provided: {upstream_key}"))
            failed = wait_for_end(http, submit_async(http, model="fake-dalle", prompt=prompt))
            assert failed["task_status"] == "failed"
            time.sleep(0.5)  # the worker's last lines, written after the end it reported
            texts = {name: log.read_text() for name, log in logs.items()}
    finally:
        for process in processes:
            stop_process(process)

    for name, text in texts.items():
        for secret in (api_key, upstream_key, webhook_secret, signature, ours["IMAGEGATE_SECRET_KEY"]):
            assert secret not in text, f"a secret in the {name} log"
    api, worker, sweeper = (_json_lines(texts[name]) for name in ("api", "worker", "sweeper"))
    assert {line["process"] for line in api} == {"api"} and {line["process"] for line in worker} == {"worker"}
    assert any(line["event"].startswith("sweep: ") for line in sweeper)

    # Intake: the request id and the key's id beside the task id, so the API's lines and the worker's join.
    (intake,) = [line for line in api if line["event"] == "task accepted" and line.get("task_id") == task_id]
    assert intake["request_id"] == request_id and intake["model"] == "local"
    api_key_id = str(uuid.UUID(intake["api_key_id"]))
    runs = [line for line in worker if line.get("task_id") == task_id and "api_key_id" in line]
    assert {(line["attempt"], line["model"], line["api_key_id"]) for line in runs} == {(1, "local", api_key_id)}
    assert any("succeed" in line["event"] for line in runs)

    # gunicorn's access log: one event per request, the image URL's signature cut from its query.
    (fetched,) = [line for line in api if line["logger"] == "gunicorn.access" and line["path"].startswith("/files/")]
    assert fetched["status"] == 200 and "signature=[redacted]" in fetched["query"]
    assert any(line.get("request_id") == request_id and line["logger"] == "gunicorn.access" for line in api)

    # The upstream's echo reached the worker's log, redacted.
    assert any("Incorrect API key provided: [redacted]" in line["event"] for line in worker)


def test_the_worker_sends_task_events_that_flower_reads(client, settings, prompt):
    """What Flower and `celery events` subscribe to, received from the test's worker through its broker."""
    celery = make_celery(settings)
    events: list[dict] = []
    subscribed = threading.Event()

    class Receiver(celery.events.Receiver):
        def on_consume_ready(self, *args, **kwargs) -> None:
            super().on_consume_ready(*args, **kwargs)
            subscribed.set()

    def of_task(task_id: str) -> set[str]:
        ours = {event["uuid"] for event in events if event["type"] == "task-received" and task_id in event["args"]}
        return {event["type"] for event in events if event.get("uuid") in ours}

    with celery.connection_for_read() as connection:
        receiver = Receiver(connection, handlers={"*": events.append})
        listening = threading.Thread(target=receiver.capture, kwargs={"wakeup": False}, daemon=True)
        listening.start()
        try:
            assert subscribed.wait(10), "the event receiver did not subscribe"
            task_id = submit_async(client, model="local", prompt=prompt, size="32x32")
            assert wait_for_end(client, task_id)["task_status"] == "succeed"
            wait_until(
                lambda: of_task(task_id) >= {"task-received", "task-started", "task-succeeded"}, 10, "the task events"
            )
        finally:
            receiver.should_stop = True
            listening.join(5)
    received = next(event for event in events if event["type"] == "task-received" and task_id in event["args"])
    assert received["name"] == "imagegate.run_task" and received["hostname"].startswith("imagegate-")
