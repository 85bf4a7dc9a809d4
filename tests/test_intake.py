"""Intake validation and auth, through create_app(settings) with the Flask test client, on real
Postgres and a Redis db index no worker consumes, so what was enqueued can be counted."""

from __future__ import annotations

import json

import pytest
import redis

from app.queue import QUEUE
from app.web import create_app


@pytest.fixture(scope="module")
def idle_settings(settings, redis_dbs):
    return settings.model_copy(update={"broker_url": redis_dbs[1]})


@pytest.fixture(scope="module")
def app(idle_settings, migrated):
    return create_app(idle_settings)


@pytest.fixture
def http(app, api_key):
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {api_key}"
    return client


@pytest.fixture
def queued(idle_settings):
    queue = redis.Redis.from_url(idle_settings.broker_url)
    queue.delete(QUEUE)
    return lambda: queue.llen(QUEUE)


BAD_BODIES = [
    # (body, status, param, code)
    ({"model": "local"}, 400, "prompt", "missing_required_parameter"),
    ({"model": "local", "prompt": ""}, 400, "prompt", "invalid_value"),
    ({"model": "local", "prompt": "   "}, 400, "prompt", "invalid_value"),
    ({"model": "local", "prompt": "x", "n": 0}, 400, "n", "invalid_value"),
    ({"model": "local", "prompt": "x", "n": 11}, 400, "n", "invalid_value"),
    ({"model": "local", "prompt": "x", "n": "2"}, 400, "n", "invalid_value"),
    ({"model": "local", "prompt": 42}, 400, "prompt", "invalid_value"),
    ({"model": "local", "prompt": "x", "async": "yes"}, 400, "async", "invalid_value"),
    ({"model": "local", "prompt": "x", "retries": -1}, 400, "retries", "invalid_value"),
    ({"model": "local", "prompt": "x", "response_format": "gif"}, 400, "response_format", "invalid_value"),
    ({"model": "local", "prompt": "x", "size": "big"}, 400, "size", "invalid_value"),
    ({"model": "local", "prompt": "x", "strength": 1.5}, 400, "strength", "invalid_value"),
    ({"model": "local", "prompt": "x", "stream": True}, 400, "stream", "invalid_value"),
    ({"model": "local", "prompt": "x", "colour": "red"}, 400, "colour", "unknown_parameter"),
    ({"model": "no-such-model", "prompt": "x"}, 404, "model", "model_not_found"),
    ([{"prompt": "x"}], 400, None, "invalid_request"),
]


@pytest.mark.parametrize("body,status,param,code", BAD_BODIES)
def test_bad_body_gets_its_error_and_stores_and_enqueues_nothing(http, count_tasks, queued, body, status, param,
                                                                 code):
    before = count_tasks()
    response = http.post("/v1/images/generations", json=body)
    assert response.status_code == status
    error = response.get_json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert error["message"]
    assert count_tasks() == before and queued() == 0


@pytest.mark.parametrize("raw", [b"{not json", b"", b'{"prompt": "x",}'])
def test_malformed_json_is_a_400_not_a_traceback(http, count_tasks, queued, raw):
    before = count_tasks()
    response = http.post("/v1/images/generations", data=raw, content_type="application/json")
    assert response.status_code == 400 and response.get_json()["error"]["code"] == "invalid_json"
    assert count_tasks() == before and queued() == 0


def test_body_too_large_is_a_413(http, idle_settings, count_tasks, queued):
    before = count_tasks()
    body = json.dumps({"model": "local", "prompt": "x", "image": "A" * idle_settings.max_body_bytes})
    response = http.post("/v1/images/generations", data=body, content_type="application/json")
    assert response.status_code == 413 and response.get_json()["error"]["code"] == "request_too_large"
    assert count_tasks() == before and queued() == 0


@pytest.mark.parametrize("header", [None, "Bearer ig_wrong", "Basic abc", "Bearer "])
def test_missing_or_bad_key_is_a_401(app, count_tasks, queued, header):
    before = count_tasks()
    headers = {"Authorization": header} if header else {}
    client = app.test_client()
    response = client.post("/v1/images/generations", json={"model": "local", "prompt": "x"}, headers=headers)
    assert response.status_code == 401
    assert response.get_json()["error"]["code"] in ("missing_api_key", "invalid_api_key")
    assert client.get("/v1/images/00000000-0000-0000-0000-000000000000", headers=headers).status_code == 401
    assert count_tasks() == before and queued() == 0


def test_a_valid_async_request_is_stored_and_enqueued_once(http, count_tasks, queued):
    # The control for the tests above: the counters do move when a request is accepted.
    before = count_tasks()
    response = http.post("/v1/images/generations/", json={"prompt": "x", "async": True})  # trailing slash too
    assert response.status_code == 202
    assert count_tasks() == before + 1 and queued() == 1
    task = http.get(f"/v1/images/{response.get_json()['task_id']}").get_json()
    assert task["task_status"] == "pending" and task["model"] == "local" and task["attempts"] == 0


def test_unknown_routes_and_methods_answer_json(http):
    assert http.get("/nope").get_json()["error"]["code"] == "not_found"
    response = http.delete("/v1/images/generations")
    assert response.status_code == 405 and response.get_json()["error"]["code"] == "method_not_allowed"


def test_healthz_needs_no_key(app):
    assert app.test_client().get("/healthz").get_json() == {"status": "ok"}
