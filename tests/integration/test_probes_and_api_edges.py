"""The probes (/healthz, /readyz), CORS, and the API's answers at its edges: a multipart body, the
endpoints not supported yet, a GET on a POST route."""

from __future__ import annotations

import pytest

from imagegate.app.migrate import upgrade
from imagegate.app.web import create_app
from tests.support.databases import drop_database, fresh_database
from tests.support.services import free_port


def test_healthz_answers_without_the_database(settings):
    app = create_app(settings.model_copy(update={"database_url": f"postgresql+psycopg://x@127.0.0.1:{free_port()}/x"}))
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    reply = client.get("/readyz")
    assert reply.status_code == 503
    error = reply.get_json()["error"]
    assert error["code"] == "not_ready" and "database" in error["message"]
    assert reply.get_json()["checks"]["database"].startswith("unreachable")


def test_readyz_names_a_stopped_broker(settings, migrated, own_redis):
    client = create_app(settings.model_copy(update={"broker_url": f"{own_redis.url}/0"})).test_client()
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.get_json()
    body = ready.get_json()
    assert body["checks"] == {"database": "ok", "broker": "ok", "migrations": "ok"}
    # Workers are reported, not required: async tasks wait, pending, for one.
    assert isinstance(body["workers"], int) and isinstance(body["sweepers"], int)

    own_redis.pause()
    reply = client.get("/readyz")
    assert reply.status_code == 503
    assert "broker" in reply.get_json()["error"]["message"]
    assert reply.get_json()["checks"]["broker"].startswith("unreachable")
    assert reply.get_json()["checks"]["database"] == "ok"


def test_readyz_names_migrations_behind_head(settings, postgres_url):
    url = fresh_database(postgres_url)
    try:
        upgrade(url, "0003")
        reply = create_app(settings.model_copy(update={"database_url": url})).test_client().get("/readyz")
        assert reply.status_code == 503
        assert "imagegate db upgrade" in reply.get_json()["checks"]["migrations"]
        assert "migrations" in reply.get_json()["error"]["message"]
    finally:
        drop_database(url)


@pytest.fixture(scope="module")
def cors_client(settings, redis_dbs, migrated):
    origins = "https://app.example.com, http://localhost:3000"
    return create_app(settings.model_copy(update={"broker_url": redis_dbs[1], "cors_origins": origins})).test_client()


def test_cors_preflight_is_answered_for_an_allowed_origin(cors_client):
    reply = cors_client.options(
        "/v1/images/generations",
        headers={
            "Origin": "https://app.example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
        },
    )
    assert reply.status_code == 204
    assert reply.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    allowed = {name.strip().lower() for name in reply.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "idempotency-key"} <= allowed
    assert "POST" in reply.headers["Access-Control-Allow-Methods"]


def test_cors_headers_on_answers_errors_included_and_never_for_other_origins(cors_client, app_client, api_key):
    refused = cors_client.post(
        "/v1/images/generations", json={"prompt": "x"}, headers={"Origin": "http://localhost:3000"}
    )
    assert refused.status_code == 401  # a page can read why
    assert refused.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert "x-request-id" in refused.headers["Access-Control-Expose-Headers"]
    other = cors_client.get("/healthz", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
    preflight = cors_client.options(
        "/v1/images/generations", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert "Access-Control-Allow-Origin" not in preflight.headers
    # Off by default.
    default = app_client.get("/healthz", headers={"Origin": "https://app.example.com"})
    assert "Access-Control-Allow-Origin" not in default.headers


def test_a_multipart_body_is_told_to_send_json(app_client, api_key, count_tasks):
    before = count_tasks()
    reply = app_client.post(
        "/v1/images/generations",
        headers={"Authorization": f"Bearer {api_key}"},
        data={"prompt": "a fox", "model": "local"},
        content_type="multipart/form-data",
    )
    assert reply.status_code == 400
    error = reply.get_json()["error"]
    assert error["param"] == "Content-Type" and "application/json" in error["message"]
    assert count_tasks() == before


def test_a_json_body_without_its_content_type_is_still_read(app_client, api_key):
    # curl -d sends application/x-www-form-urlencoded; the README's examples rely on this.
    reply = app_client.post(
        "/v1/images/generations",
        headers={"Authorization": f"Bearer {api_key}"},
        data='{"prompt": "a fox", "model": "local", "async": true}',
        content_type="application/x-www-form-urlencoded",
    )
    assert reply.status_code == 202, reply.get_json()


def test_variations_say_not_supported_yet(app_client, api_key):
    path = "/v1/images/variations"
    reply = app_client.post(
        path, headers={"Authorization": f"Bearer {api_key}"}, data={"prompt": "x"}, content_type="multipart/form-data"
    )
    assert reply.status_code == 400
    error = reply.get_json()["error"]
    assert error["code"] == "unsupported_endpoint" and "not supported yet" in error["message"]
    assert app_client.post(path).status_code == 401  # like every /v1 route


def test_edits_need_a_key_like_every_v1_route(app_client):
    assert app_client.post("/v1/images/edits", data={"prompt": "x"}).status_code == 401


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/images/edits", "/v1/images/variations"])
def test_a_get_on_a_post_route_is_405_naming_post(app_client, api_key, path):
    reply = app_client.get(path, headers={"Authorization": f"Bearer {api_key}"})
    assert reply.status_code == 405 and "POST" in reply.headers["Allow"]
    assert reply.get_json()["error"]["code"] == "method_not_allowed"
