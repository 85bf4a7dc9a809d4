"""Intake under abuse and lost messages, through real API servers: a replayed synchronous request
answers at once, a synchronous request is answered even when its task's end is never announced, a
trickled body gets 408, and one client cannot hold every connection of a process."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid

import httpx
import psycopg
import pytest

from tests.support.processes import start_api, stop_process
from tests.support.services import free_port, wait_until

BODY_TIMEOUT_S = 1.5
PER_CLIENT = 3
NORMAL_PROMPT = "a normal request to the quiet server"


@pytest.fixture(scope="module")
def quiet_api(migrated, env, redis_dbs, run_dir, database_url):
    """An API server publishing where no worker consumes, with a short body timeout and a small
    per-client limit. Its tasks stay pending: they are ended afterwards, so no sweeper test finds them."""
    port = free_port()
    quiet = env | {
        "IMAGEGATE_BROKER_URL": redis_dbs[1],
        "IMAGEGATE_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "IMAGEGATE_MAX_REQUESTS_PER_CLIENT": str(PER_CLIENT),
    }
    process = start_api(quiet, run_dir / "api-quiet.log", port)
    base = f"http://127.0.0.1:{port}"
    try:
        yield base, port
    finally:
        stop_process(process)
        with psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as db:
            db.execute(
                "UPDATE tasks SET status = 'failed', error_code = 'cancelled', finished_at = now() "
                "WHERE status = 'pending' AND request->>'prompt' = %s",
                (NORMAL_PROMPT,),
            )


def test_an_idempotent_replay_of_a_finished_sync_task_answers_at_once(client, prompt):
    headers = {"Idempotency-Key": f"sync-{uuid.uuid4().hex}"}
    body = {"model": "local", "prompt": prompt, "size": "256x256", "response_format": "url"}
    first = client.post("/v1/images/generations", json=body, headers=headers)
    assert first.status_code == 200, first.text
    # The task ended before this request: no announcement will come. Before the fix the replay
    # waited for one until the sync timeout (30 s here).
    replay = client.post("/v1/images/generations", json=body, headers=headers, timeout=10)
    assert replay.status_code == 200, replay.text
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json()["task_id"] == first.json()["task_id"]
    assert replay.json()["task_status"] == "succeed" and len(replay.json()["data"]) == 1


def test_a_sync_request_is_answered_when_its_end_is_never_announced(quiet_api, api_key, database_url):
    """No worker consumes this server's queue and nothing announces the end: the task is ended by
    hand in Postgres, and only the waiting request's own re-read can find out."""
    base, _ = quiet_api
    prompt = f"unannounced {uuid.uuid4().hex}"
    answer: dict = {}

    def wait() -> None:
        answer["response"] = httpx.post(
            f"{base}/v1/images/generations",
            timeout=25,
            headers={"Authorization": f"Bearer {api_key}"},
            json={"model": "local", "prompt": prompt, "response_format": "url"},
        )

    waiter = threading.Thread(target=wait)
    waiter.start()
    plain_url = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain_url, autocommit=True) as connection:

        def task_id():
            row = connection.execute("SELECT id FROM tasks WHERE request->>'prompt' = %s", (prompt,)).fetchone()
            return row and row[0]

        wait_until(task_id, 10, "the synchronous request's task")
        connection.execute(
            "UPDATE tasks SET status = 'failed', error_code = 'cancelled', error_message = 'ended "
            "by hand', finished_at = now() WHERE id = %s",
            (task_id(),),
        )
    waiter.join(timeout=30)
    response = answer["response"]
    assert response.status_code == 409 and response.json()["error"]["code"] == "cancelled"
    assert response.json()["task_status"] == "failed"


def _trickler(
    port: int,
    api_key: str,
    length: int = 200,
    path: str = "/v1/images/generations",
    content_type: str = "application/json",
    start: str = "{",
) -> socket.socket:
    """A connection that sends a request's headers and the start of its body, then nothing."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {api_key}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n{start}"
        ).encode()
    )
    return sock


def _read_reply(sock: socket.socket, timeout_s: float, trickle: bool = False) -> bytes:
    """Whatever the server answers within timeout_s, sending another body byte every 0.2 s if asked."""
    deadline, received = time.monotonic() + timeout_s, b""
    sock.settimeout(0.2)
    while time.monotonic() < deadline and b"\r\n\r\n" not in received:
        try:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        except TimeoutError:
            if trickle:
                try:
                    sock.sendall(b" ")
                except OSError:
                    pass
    sock.settimeout(1)
    try:  # the rest of the body of the reply
        while chunk := sock.recv(65536):
            received += chunk
    except OSError:
        pass
    return received


def test_a_trickled_body_gets_408_in_openai_shape(quiet_api, api_key):
    _, port = quiet_api
    sock = _trickler(port, api_key)
    started = time.monotonic()
    try:
        reply = _read_reply(sock, timeout_s=15, trickle=True)  # a byte every 0.2 s, never the whole body
    finally:
        sock.close()
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert time.monotonic() - started >= BODY_TIMEOUT_S
    error = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"


def test_a_trickled_multipart_edit_gets_408_too(quiet_api, api_key):
    _, port = quiet_api
    start = '--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n'
    sock = _trickler(port, api_key, 2000, "/v1/images/edits", "multipart/form-data; boundary=b", start)
    try:
        reply = _read_reply(sock, timeout_s=15, trickle=True)
    finally:
        sock.close()
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"


def test_one_client_cannot_hold_more_than_its_share_of_requests(quiet_api, api_key):
    base, port = quiet_api
    headers = {"Authorization": f"Bearer {api_key}"}
    body = {"model": "local", "prompt": NORMAL_PROMPT, "async": True}
    held = [_trickler(port, api_key) for _ in range(PER_CLIENT)]
    try:
        wait_until(
            lambda: httpx.post(f"{base}/v1/images/generations", headers=headers, json=body).status_code == 429,
            5,
            "the per-client limit to refuse",
        )
        refused = httpx.post(f"{base}/v1/images/generations", headers=headers, json=body)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_concurrent_requests"
        for sock in held:  # the body timeout frees them
            assert _read_reply(sock, timeout_s=10).startswith(b"HTTP/1.1 408")
    finally:
        for sock in held:
            sock.close()
    accepted = httpx.post(f"{base}/v1/images/generations", headers=headers, json=body)
    assert accepted.status_code == 202, accepted.text
