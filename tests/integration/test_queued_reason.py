"""`queued_reason` as a client sees it: GET /v1/images/{id} says why a pending task waits on its
model's upstream limits, null otherwise (always present), and /openapi.json documents it."""

from __future__ import annotations

import uuid

from imagegate.app.db import make_engine
from imagegate.app.state.tasks import QueuedReason
from imagegate.app.stores.attempts import AttemptStore, Wait, Waiting


def test_a_waiting_task_says_why_and_a_claimed_one_says_null(app_client, api_key, database_url):
    headers = {"Authorization": f"Bearer {api_key}"}
    created = app_client.post(
        "/v1/images/generations",
        json={"model": "local", "prompt": f"wait {uuid.uuid4()}", "async": True},
        headers=headers,
    )
    assert created.status_code == 202, created.get_json()
    task_id = uuid.UUID(created.get_json()["task_id"])
    body = app_client.get(f"/v1/images/{task_id}", headers=headers).get_json()
    assert body["task_status"] == "pending" and body["queued_reason"] is None

    engine = make_engine(database_url, pool_size=1, pre_ping=False)
    try:
        store = AttemptStore(engine)
        waiting = store.claim(
            task_id,
            1,
            worker="w",
            lease_s=60,
            plan=lambda claim, done: [0],
            admit=lambda claim, slots: Wait(QueuedReason.MODEL_RATE_LIMIT, 30),
        )
        assert isinstance(waiting, Waiting)
        body = app_client.get(f"/v1/images/{task_id}", headers=headers).get_json()
        assert body["task_status"] == "pending" and body["queued_reason"] == "model_rate_limit"
        assert body["attempts"] == 0

        assert store.claim(task_id, 1, worker="w", lease_s=60, plan=lambda claim, done: [0], admit=lambda c, s: None)
        body = app_client.get(f"/v1/images/{task_id}", headers=headers).get_json()
        assert body["task_status"] == "running" and body["queued_reason"] is None and body["attempts"] == 1
    finally:
        engine.dispose()


def test_openapi_documents_queued_reason_on_the_task(app_client):
    schemas = app_client.get("/openapi.json").get_json()["components"]["schemas"]
    field = schemas["TaskView"]["properties"]["queued_reason"]
    (reference,) = [choice["$ref"] for choice in field["anyOf"] if "$ref" in choice]
    assert set(schemas[reference.rsplit("/", 1)[-1]]["enum"]) == {"model_concurrency_limit", "model_rate_limit"}
