"""Intake validation and auth, through create_app(settings) with the Flask test client, on real
Postgres and a Redis db index no worker consumes, so what was enqueued can be counted."""

from __future__ import annotations

import json

import pytest
import redis

from imagegate.app.queue import QUEUE
from imagegate.app.web import create_app


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
    ({"model": "local", "prompt": "x", "stream": 0}, 400, "stream", "invalid_value"),  # 0 == False, yet not false
    ({"model": "local", "prompt": "x", "partial_images": False}, 400, "partial_images", "invalid_value"),
    ({"model": "local", "prompt": "x", "colour": "red"}, 400, "colour", "unknown_parameter"),
    ({"model": "no-such-model", "prompt": "x"}, 404, "model", "model_not_found"),
    ([{"prompt": "x"}], 400, None, "invalid_request"),
]


@pytest.mark.parametrize("body,status,param,code", BAD_BODIES)
def test_bad_body_gets_its_error_and_stores_and_enqueues_nothing(http, count_tasks, queued, body, status, param, code):
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


# -- what an adversarial probe sent ------------------------------------------------------------

NUL = "a\u0000b"
NUL_BODIES = [
    # (body, param): Postgres stores no NUL in text or jsonb, so it is refused at validation
    ({"prompt": NUL}, "prompt"),
    ({"prompt": "x", "user": NUL}, "user"),
    ({"prompt": "x", "negative_prompt": NUL}, "negative_prompt"),
    ({"prompt": "x", "image": ["https://example.com/a.png", NUL]}, "image"),
    ({"prompt": "x", "extra_body": {"seed": NUL}}, "extra_body"),
    ({"prompt": "x", "extra_body": {"nested": [{"deeper": {"k": NUL}}]}}, "extra_body"),
    ({"prompt": "x", "extra_body": {NUL: 1}}, "extra_body"),
]


@pytest.mark.parametrize("body,param", NUL_BODIES)
def test_a_nul_character_anywhere_is_a_400_naming_the_field(http, count_tasks, queued, body, param):
    before = count_tasks()
    response = http.post("/v1/images/generations", json=body | {"model": "local", "async": True})
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, "invalid_value")
    assert "NUL" in error["message"]
    assert count_tasks() == before and queued() == 0


def _batch_error(http, **post) -> dict:
    response = http.post("/v1/images/batches", **post)
    assert response.status_code == 400, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    return error


def test_a_nul_character_in_a_batch_names_the_line_and_field(http, count_tasks):
    before = count_tasks()
    lines = [
        {"custom_id": NUL, "body": {"prompt": "x"}},
        {"custom_id": "b", "body": {"prompt": NUL}},
        {"custom_id": "c", "body": {"prompt": "x", "extra_body": {"a": [NUL]}}},
        {"custom_id": "d", "body": {"prompt": "x", "user": NUL}},
        {"custom_id": "ok", "body": {"prompt": "x"}},
    ]
    for post in (
        {"json": {"requests": lines}},
        {"data": "\n".join(json.dumps(line) for line in lines), "content_type": "application/jsonl"},
    ):
        error = _batch_error(http, **post)
        assert error["code"] == "invalid_batch"
        assert [(line["line"], line["param"]) for line in error["lines"]] == [
            (1, "custom_id"),
            (2, "body.prompt"),
            (3, "body.extra_body"),
            (4, "body.user"),
        ]
    error = _batch_error(http, json={"requests": lines[-1:], "metadata": {"note": [NUL]}})
    assert (error["param"], error["code"]) == ("metadata", "invalid_value")
    assert count_tasks() == before


DEEP = 5000  # json.loads would raise RecursionError past about 1000


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_deeply_nested_json_is_a_400_not_a_500(http, count_tasks):
    before = count_tasks()
    single = '{"prompt": "x", "extra_body": {"a": %s}}' % _nested(DEEP)
    response = http.post("/v1/images/generations", data=single, content_type="application/json")
    assert response.status_code == 400 and response.get_json()["error"]["code"] == "invalid_json"
    line = '{"custom_id": "deep", "body": {"prompt": "x", "extra_body": {"a": %s}}}' % _nested(DEEP)
    error = _batch_error(http, data=line, content_type="application/jsonl")
    assert error["code"] == "invalid_batch" and error["lines"][0]["line"] == 1
    error = _batch_error(http, data='{"requests": [%s]}' % line, content_type="application/json")
    assert error["code"] == "invalid_batch"
    error = _batch_error(http, data='{"requests": [], "metadata": %s}' % _nested(DEEP), content_type="application/json")
    assert error["code"] == "invalid_batch"
    assert count_tasks() == before


def test_a_batch_envelope_is_validated_by_its_model(http, count_tasks):
    before = count_tasks()
    line = {"custom_id": "a", "body": {"prompt": "x"}}
    for body, param, code in [
        ({"requests": [line], "colour": 1}, "colour", "unknown_parameter"),
        ({"requests": "nope"}, "requests", "invalid_value"),
        ({"requests": [line], "metadata": [1]}, "metadata", "invalid_value"),
        ({"requests": [line], "callback_url": 5}, "callback_url", "invalid_value"),
        ({"requests": []}, "requests", "empty_batch"),
    ]:
        error = _batch_error(http, json=body)
        assert (error["param"], error["code"]) == (param, code), body
    assert count_tasks() == before


@pytest.mark.parametrize(
    "query",
    [
        "expires=%C2%B2&signature=x",
        f"expires={'9' * 5000}&signature=x",
        "expires=99999999999&signature=%C3%A9",
        "expires=&signature=",
        "",
    ],
)
def test_a_malformed_signed_image_url_is_a_404_not_a_500(app, query):
    response = app.test_client().get(f"/files/images/00000000-0000-0000-0000-000000000000.png?{query}")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "image_not_found"


@pytest.mark.parametrize("limit", ["²", "9" * 5000, "0", "x"])
def test_a_malformed_deliveries_limit_is_a_400(http, limit):
    response = http.get("/v1/webhooks/deliveries", query_string={"limit": limit})
    assert response.status_code == 400 and response.get_json()["error"]["param"] == "limit"


def test_every_405_says_which_methods_are_allowed(http):
    for method, path, allowed in [
        ("delete", "/v1/images/generations", "POST"),
        ("put", "/v1/images/batches", "POST"),
        ("post", "/v1/webhooks/deliveries", "GET"),
        ("post", "/openapi.json", "GET"),
        # not a task lookup of a task called "generations"
        ("get", "/v1/images/generations", "POST"),
        ("get", "/v1/images/batches", "POST"),
    ]:
        response = getattr(http, method)(path)
        assert response.status_code == 405 and response.get_json()["error"]["code"] == "method_not_allowed"
        assert allowed in response.headers["Allow"].split(", ") and "DELETE" not in response.headers["Allow"], path
