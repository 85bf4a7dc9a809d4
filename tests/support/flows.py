"""What a client does over and over: submit a task, wait for its end."""

from __future__ import annotations

import time

import httpx


def wait_for_end(client: httpx.Client, task_id: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = client.get(f"/v1/images/{task_id}").json()
        if body["task_status"] in ("succeed", "failed"):
            return body
        time.sleep(0.1)
    raise AssertionError(f"task {task_id} did not end within {timeout_s} s: {body}")


def submit_async(client: httpx.Client, **fields) -> str:
    response = client.post("/v1/images/generations", json={"async": True} | fields)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["task_status"] == "pending" and body["data"] == [] and isinstance(body["created"], int)
    return body["task_id"]
