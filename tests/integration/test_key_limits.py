"""Per-key limits at intake, through create_app(settings) in this process on real Postgres and the
Redis db index no worker consumes (so accepted tasks stay pending): requests per minute, images per
day, tasks pending or running, batches, Idempotency-Key replays, the settings' defaults, the
x-ratelimit-* headers, and the embedded mode (SQLite, no Redis)."""

from __future__ import annotations

import re
import uuid

import pytest
import redis
from sqlalchemy import create_engine, func, select

from imagegate.app.db import make_engine, make_sessionmaker
from imagegate.app.key_limits import StoredLimits
from imagegate.app.keys import create_key
from imagegate.app.migrate import upgrade
from imagegate.app.models import Batch, IdempotencyKey, Task
from imagegate.app.queue import QUEUE
from imagegate.app.web import create_app

GENERATIONS, BATCHES = "/v1/images/generations", "/v1/images/batches"
DURATION = re.compile(r"^(\d+h)?(\d+m)?\d+s$|^\d+ms$")
HEADERS = [f"x-ratelimit-{part}-{what}" for what in ("requests", "images") for part in ("limit", "remaining", "reset")]


@pytest.fixture(scope="module")
def idle_settings(settings, redis_dbs):
    return settings.model_copy(update={"broker_url": redis_dbs[1]})


@pytest.fixture(scope="module")
def app(idle_settings, migrated):
    return create_app(idle_settings)


@pytest.fixture(scope="module")
def sessions(database_url, migrated):
    engine = make_engine(database_url, pool_size=1)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def queued(idle_settings):
    queue = redis.Redis.from_url(idle_settings.broker_url)
    return lambda: queue.llen(QUEUE)


@pytest.fixture
def client_with(app, sessions):
    """A test client for a new key with these limits of its own."""

    def make(application=None, **limits):
        key = create_key(sessions, f"limited-{uuid.uuid4().hex[:8]}", limits=StoredLimits(**limits)).key
        client = (application or app).test_client()
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {key}"
        return client

    return make


def submit(client, n: int = 1, **extra):
    return client.post(GENERATIONS, json={"model": "local", "prompt": "a limited fox", "n": n, "async": True}, **extra)


def batch(client, *ns: int, **extra):
    lines = [{"custom_id": f"line-{i}", "body": {"model": "local", "prompt": "x", "n": n}} for i, n in enumerate(ns)]
    return client.post(BATCHES, json={"requests": lines}, **extra)


def tasks_of(sessions, client) -> int:
    key_id = _key_id(sessions, client)
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(Task).where(Task.api_key_id == key_id))


def _key_id(sessions, client):
    from imagegate.app.keys import hash_key
    from imagegate.app.models import ApiKey

    key = client.environ_base["HTTP_AUTHORIZATION"].removeprefix("Bearer ")
    with sessions() as session:
        return session.scalar(select(ApiKey.id).where(ApiKey.key_hash == hash_key(key)))


def assert_rate_limited(reply, code: str) -> int:
    """A 429 in OpenAI's error shape with a Retry-After in whole seconds; returns that."""
    assert reply.status_code == 429, reply.get_data(as_text=True)
    error = reply.get_json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "rate_limit_error" and error["code"] == code
    return int(reply.headers["Retry-After"])


def test_requests_per_minute_refuse_the_next_with_429_and_store_nothing(client_with, sessions, queued):
    client = client_with(rpm=3)
    for remaining in (2, 1, 0):
        reply = submit(client)
        assert reply.status_code == 202, reply.get_data(as_text=True)
        assert reply.headers["x-ratelimit-limit-requests"] == "3"
        assert reply.headers["x-ratelimit-remaining-requests"] == str(remaining)
        assert DURATION.match(reply.headers["x-ratelimit-reset-requests"])
        assert "x-ratelimit-limit-images" not in reply.headers  # that limit is off for this key
    task_id = reply.get_json()["task_id"]
    stored, published = tasks_of(sessions, client), queued()

    refused = submit(client)
    assert 1 <= assert_rate_limited(refused, "rate_limit_exceeded") <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert tasks_of(sessions, client) == stored and queued() == published

    # Reading is not limited, and still says where the key stands.
    read = client.get(f"/v1/images/{task_id}")
    assert read.status_code == 200 and read.headers["x-ratelimit-remaining-requests"] == "0"


def test_images_per_day_count_n_exactly_and_a_refusal_takes_nothing(client_with, sessions):
    client = client_with(images_per_day=5)
    first = submit(client, n=2)
    assert first.status_code == 202
    assert first.headers["x-ratelimit-limit-images"] == "5" and first.headers["x-ratelimit-remaining-images"] == "3"
    assert re.match(r"^(23h|24h0m0s)", first.headers["x-ratelimit-reset-images"])  # a day from the first image

    refused = submit(client, n=4)
    assert 3600 < assert_rate_limited(refused, "images_per_day_exceeded") <= 86_400
    assert refused.headers["x-ratelimit-remaining-images"] == "3"  # the 4 asked were not taken
    assert submit(client, n=3).headers["x-ratelimit-remaining-images"] == "0"

    never = submit(client, n=6)  # more than the whole day's allowance: a 400, not a 429 to retry
    assert never.status_code == 400 and never.get_json()["error"]["code"] == "exceeds_key_limit"
    assert never.get_json()["error"]["param"] == "n"
    assert tasks_of(sessions, client) == 2


def test_tasks_pending_or_running_are_limited_and_an_ended_one_frees_its_place(client_with, sessions):
    client = client_with(max_pending=2)
    first = submit(client).get_json()["task_id"]
    assert submit(client).status_code == 202
    refused = submit(client)
    assert assert_rate_limited(refused, "too_many_pending_tasks") >= 1
    assert batch(client, 1).status_code == 429  # a batch's lines take places too
    assert batch(client, 1, 1, 1).get_json()["error"]["code"] == "exceeds_key_limit"
    assert tasks_of(sessions, client) == 2

    assert client.post(f"/v1/images/{first}/cancel").status_code == 200  # pending: failed `cancelled` now
    assert submit(client).status_code == 202


def test_a_batch_counts_its_lines_as_requests_and_sums_their_images(client_with, sessions):
    client = client_with(rpm=5, images_per_day=10)
    accepted = batch(client, 1, 2, 1)
    assert accepted.status_code == 202, accepted.get_data(as_text=True)
    assert accepted.headers["x-ratelimit-remaining-requests"] == "2"
    assert accepted.headers["x-ratelimit-remaining-images"] == "6"

    batches_before = _batches_of(sessions, client)
    refused = batch(client, 1, 1, 1)
    assert_rate_limited(refused, "rate_limit_exceeded")
    assert refused.headers["x-ratelimit-remaining-requests"] == "2"
    assert _batches_of(sessions, client) == batches_before and tasks_of(sessions, client) == 3

    never = batch(client, *[1] * 6)
    assert never.status_code == 400 and never.get_json()["error"]["param"] == "requests"
    assert batch(client, 3, 3).status_code == 202  # what is left fits exactly


def _batches_of(sessions, client) -> int:
    key_id = _key_id(sessions, client)
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(Batch).where(Batch.api_key_id == key_id))


def test_an_idempotent_replay_is_not_charged_and_a_refusal_keeps_no_key(client_with, sessions):
    client = client_with(rpm=2)
    first = submit(client, headers={"Idempotency-Key": "first"})
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    replay = submit(client, headers={"Idempotency-Key": "first"})
    assert replay.status_code == 202 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.get_json()["task_id"] == first.get_json()["task_id"]
    assert replay.headers["x-ratelimit-remaining-requests"] == "1"

    assert submit(client).headers["x-ratelimit-remaining-requests"] == "0"
    assert submit(client, headers={"Idempotency-Key": "first"}).status_code == 202  # a replay at the limit too

    assert_rate_limited(submit(client, headers={"Idempotency-Key": "second"}), "rate_limit_exceeded")
    with sessions() as session:
        keys = session.scalars(
            select(IdempotencyKey.key).where(IdempotencyKey.api_key_id == _key_id(sessions, client))
        ).all()
    assert keys == ["first"]


def test_every_authenticated_v1_answer_carries_the_headers_and_no_other_does(client_with, app):
    client = client_with(rpm=10, images_per_day=20)
    answers = [
        client.get(f"/v1/images/{uuid.uuid4()}"),  # 404
        client.get("/v1/webhooks/deliveries"),
        client.post(GENERATIONS, json={"model": "local"}),  # 400
        client.get(f"{BATCHES}/{uuid.uuid4()}"),
    ]
    for reply in answers:
        assert all(name in reply.headers for name in HEADERS), (reply.status_code, dict(reply.headers))
        assert reply.headers["x-ratelimit-remaining-requests"] == "10"  # none of them was a submit
        assert reply.headers["x-ratelimit-reset-requests"] == "0s"  # nothing counted yet
    anonymous = app.test_client()
    assert not any(name in anonymous.get(f"/v1/images/{uuid.uuid4()}").headers for name in HEADERS)  # a 401
    assert not any(name in client.get("/healthz").headers for name in HEADERS)


def test_the_settings_defaults_apply_to_keys_without_their_own(idle_settings, client_with):
    defaults = idle_settings.model_copy(update={"default_rpm": 2, "default_images_per_day": 3})
    application = create_app(defaults)
    try:
        following = client_with(application)
        assert submit(following).headers["x-ratelimit-limit-images"] == "3"
        assert submit(following).headers["x-ratelimit-remaining-requests"] == "0"
        assert_rate_limited(submit(following), "rate_limit_exceeded")

        unlimited = client_with(application, rpm=0, images_per_day=0)  # its own 0: no limit
        for _ in range(3):
            reply = submit(unlimited)
            assert reply.status_code == 202 and "x-ratelimit-limit-requests" not in reply.headers

        own = client_with(application, rpm=5)  # its own rpm, the default images per day
        reply = submit(own)
        assert reply.headers["x-ratelimit-limit-requests"] == "5" and reply.headers["x-ratelimit-limit-images"] == "3"
    finally:
        application.extensions["imagegate"].engine.dispose()


def test_the_openapi_document_declares_the_429_of_both_submits(app):
    paths = app.test_client().get("/openapi.json").get_json()["paths"]
    assert "429" in paths[GENERATIONS]["post"]["responses"]
    assert "429" in paths[BATCHES]["post"]["responses"]


def test_the_embedded_mode_limits_in_memory_on_sqlite(tmp_path, settings):
    """SQLite and the filesystem broker, no Redis: the windows are counted in the API process, the
    pending tasks in the SQLite file."""
    url = f"sqlite:///{tmp_path / 'embedded.db'}"
    upgrade(url)
    for folder in ("broker", "broker-control"):  # as `imagegate up` makes them
        (tmp_path / folder).mkdir()
    embedded = settings.model_copy(
        update={"database_url": url, "broker_url": "filesystem://", "data_dir": tmp_path, "embedded": True}
    )
    application = create_app(embedded)
    engine = create_engine(url)
    try:
        sessions = make_sessionmaker(engine)
        key = create_key(sessions, "embedded", limits=StoredLimits(rpm=3, max_pending=2)).key
        client = application.test_client()
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {key}"
        first, second = submit(client), submit(client)
        assert (first.status_code, second.status_code) == (202, 202)
        refused = submit(client)
        assert_rate_limited(refused, "too_many_pending_tasks")
        assert refused.headers["x-ratelimit-remaining-requests"] == "1"  # the refusal took no request
        assert client.post(f"/v1/images/{first.get_json()['task_id']}/cancel").status_code == 200
        assert submit(client).headers["x-ratelimit-remaining-requests"] == "0"
        assert client.post(f"/v1/images/{second.get_json()['task_id']}/cancel").status_code == 200
        assert_rate_limited(submit(client), "rate_limit_exceeded")  # a free place, but no request left
    finally:
        application.extensions["imagegate"].engine.dispose()
        engine.dispose()


def test_an_update_changes_only_the_limits_given_and_the_api_applies_it(idle_settings, sessions):
    from imagegate.app.keys import authenticate, update_key

    name = f"updated-{uuid.uuid4().hex[:8]}"
    key = create_key(sessions, name, limits=StoredLimits(rpm=5, images_per_day=50, max_pending=3)).key
    assert update_key(sessions, name, rpm=1, max_pending=None)  # images_per_day left as it is
    assert authenticate(sessions, key).limits == StoredLimits(rpm=1, images_per_day=50, max_pending=None)
    assert not update_key(sessions, "no-such-key", rpm=1)

    application = create_app(idle_settings.model_copy(update={"key_cache_ttl_s": 0}))
    try:
        client = application.test_client()
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {key}"
        assert submit(client).status_code == 202
        assert update_key(sessions, name, rpm=2)
        assert submit(client).headers["x-ratelimit-remaining-requests"] == "0"  # 2 per minute now, 2 used
    finally:
        application.extensions["imagegate"].engine.dispose()
