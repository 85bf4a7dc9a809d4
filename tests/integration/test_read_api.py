"""What a client reads about its own use, through create_app(settings) in this process on real
Postgres (messages go to a Redis db index no worker consumes, so tasks stay pending): its task list,
deleting a task, the models it may use, and its usage."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import SecretStr
from sqlalchemy import create_engine, select

from imagegate.app.db import make_engine, make_sessionmaker
from imagegate.app.keys import authenticate, create_key
from imagegate.app.models import Task
from imagegate.app.web import create_app

ADMIN_TOKEN = "admin-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def app(settings, redis_dbs, migrated):
    # Keys are looked up on every request, so a key changed by a test applies at once.
    return create_app(
        settings.model_copy(
            update={"broker_url": redis_dbs[1], "key_cache_ttl_s": 0, "admin_token": SecretStr(ADMIN_TOKEN)}
        )
    )


@pytest.fixture(scope="module")
def sessions(database_url):
    engine = make_engine(database_url, pool_size=1)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def stored(database_url):
    """A task's row as stored."""
    engine = create_engine(database_url)

    def row(task_id: str):
        with engine.connect() as connection:
            return connection.execute(select(Task).where(Task.id == uuid.UUID(task_id))).one()

    yield row
    engine.dispose()


@pytest.fixture
def new_client(app, sessions):
    """A test client with a key of its own (nothing else listed or counted), optionally limited."""

    def make(models: list[str] | None = None):
        name = f"reader-{uuid.uuid4().hex[:8]}"
        key = create_key(sessions, name, models=models).key
        client = app.test_client()
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {key}"
        client.key_name = name
        return client

    return make


def submit(client, **fields) -> str:
    response = client.post("/v1/images/generations", json={"prompt": "a quiet harbour", "async": True} | fields)
    assert response.status_code == 202, response.get_json()
    return response.get_json()["task_id"]


def assert_error(response, status: int, param: str | None, code: str) -> None:
    assert response.status_code == status, response.get_json()
    error = response.get_json()["error"]
    assert {"message", "type", "param", "code"} <= set(error) and error["message"]
    assert (error["param"], error["code"]) == (param, code)


# -- GET /v1/images ---------------------------------------------------------------------------
def test_the_list_is_newest_first_in_pages_following_after(new_client):
    client = new_client()
    ids = [submit(client) for _ in range(5)]
    seen, after, pages = [], None, 0
    while True:
        response = client.get("/v1/images", query_string={"limit": 2} | ({"after": after} if after else {}))
        assert response.status_code == 200
        page = response.get_json()
        assert page["object"] == "list" and len(page["data"]) <= 2
        assert page["first_id"] == page["data"][0]["task_id"] and page["last_id"] == page["data"][-1]["task_id"]
        seen += [item["task_id"] for item in page["data"]]
        pages += 1
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == ids[::-1] and pages == 3
    item = client.get("/v1/images").get_json()["data"][0]
    assert item == client.get(f"/v1/images/{ids[-1]}").get_json()  # the same object as GET /v1/images/{id}


def test_an_empty_list_and_another_keys_tasks(new_client):
    mine, theirs = new_client(), new_client()
    submit(theirs)
    assert mine.get("/v1/images").get_json() == {
        "object": "list",
        "data": [],
        "first_id": None,
        "last_id": None,
        "has_more": False,
    }
    their_task = theirs.get("/v1/images").get_json()["last_id"]
    assert_error(mine.get("/v1/images", query_string={"after": their_task}), 400, "after", "invalid_value")


def test_the_list_filters(new_client):
    client = new_client()
    local, grok = submit(client, model="local"), submit(client, model="fake-grok")
    cancelled = submit(client, model="local")
    assert client.post(f"/v1/images/{cancelled}/cancel").status_code == 200
    batch = client.post(
        "/v1/images/batches", json={"requests": [{"custom_id": "a", "body": {"model": "local", "prompt": "x"}}]}
    ).get_json()

    def listed(**query) -> list[str]:
        response = client.get("/v1/images", query_string=query)
        assert response.status_code == 200, response.get_json()
        return [item["task_id"] for item in response.get_json()["data"]]

    (batch_task,) = listed(batch_id=batch["id"])
    assert set(listed()) == {local, grok, cancelled, batch_task}
    assert listed(model="fake-grok") == [grok]
    assert listed(status="failed") == [cancelled]
    assert set(listed(status="pending")) == {local, grok, batch_task}
    assert listed(status="pending", model="local", batch_id=batch["id"]) == [batch_task]
    assert listed(created_after=int(time.time()) + 60) == []
    assert len(listed(created_after=(datetime.now(UTC) - timedelta(minutes=5)).isoformat())) == 4
    assert len(listed(created_after="2000-01-01T00:00:00")) == 4  # no zone: UTC


@pytest.mark.parametrize(
    "query,param",
    [
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"status": "done"}, "status"),
        ({"batch_id": "not-an-id"}, "batch_id"),
        ({"after": "not-an-id"}, "after"),
        ({"after": str(uuid.uuid4())}, "after"),
        ({"created_after": "yesterday"}, "created_after"),
        ({"created_after": "9999-12-31T23:00:00-05:00"}, "created_after"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_list_parameters_are_400_naming_them(new_client, query, param):
    response = new_client().get("/v1/images", query_string=query)
    assert_error(response, 400, param, "unknown_parameter" if param == "colour" else "invalid_value")


# -- DELETE /v1/images/{task_id} --------------------------------------------------------------
def test_deleting_a_pending_task_cancels_it_and_drops_its_request(new_client, stored):
    client, other = new_client(), new_client()
    task_id = submit(client, prompt="a secret prompt", n=3, negative_prompt="nothing secret")
    assert_error(other.delete(f"/v1/images/{task_id}"), 404, "task_id", "task_not_found")
    assert stored(task_id).deleted is False

    response = client.delete(f"/v1/images/{task_id}")
    assert response.status_code == 200
    assert response.get_json() == {"id": task_id, "object": "image.task", "deleted": True, "task_status": "failed"}
    view = client.get(f"/v1/images/{task_id}").get_json()
    assert view["deleted"] is True and view["task_status"] == "failed" and view["error"]["code"] == "cancelled"
    assert "data" not in view
    row = stored(task_id)
    assert row.deleted and row.request == {"prompt": "(deleted)", "n": 3}  # n is kept for usage
    assert row.created_at and row.finished_at

    again = client.delete(f"/v1/images/{task_id}")  # idempotent
    assert again.status_code == 200 and again.get_json() == response.get_json()
    listed = client.get("/v1/images").get_json()["data"]
    assert [(item["task_id"], item["deleted"]) for item in listed] == [(task_id, True)]


@pytest.mark.parametrize("task_id", ["not-an-id", str(uuid.uuid4())])
def test_deleting_what_is_not_there_is_404(new_client, task_id):
    assert_error(new_client().delete(f"/v1/images/{task_id}"), 404, "task_id", "task_not_found")


# -- /v1/models -------------------------------------------------------------------------------
def test_every_model_for_an_unlimited_key_with_its_capabilities(new_client, providers_file):
    client = new_client()
    listing = client.get("/v1/models").get_json()
    assert listing["object"] == "list"
    names = [model["id"] for model in listing["data"]]
    assert names == ["local", "fake-dalle", "fake-grok", "fake-async", "fake-one"] + names[5:]
    assert {"fake-primary", "fake-backup", "fake-chat", "fake-strict"} <= set(names)
    models = {model["id"]: model for model in listing["data"]}
    created = int(providers_file.stat().st_mtime)
    for model in listing["data"]:
        assert set(model) == {"id", "object", "created", "owned_by", "imagegate"}
        assert model["object"] == "model" and model["created"] == created
    grok = models["fake-grok"]["imagegate"]
    assert grok["family"] == "grok" and grok["max_n"] == 10 and grok["max_prompt_chars"] == 1000
    assert "960x960" in grok["sizes"] and "16:9" in grok["aspect_ratios"]
    assert models["fake-grok"]["owned_by"] == "openai" and grok["async_upstream"] is False
    assert models["fake-async"]["imagegate"]["async_upstream"] is True
    assert models["fake-primary"]["imagegate"]["fallbacks"] == ["fake-backup"]
    assert models["fake-primary"]["imagegate"]["max_retries"] == 0
    assert models["fake-chat"]["imagegate"]["max_images_per_call"] == 1
    assert models["fake-one"]["imagegate"]["max_images_per_call"] == 1
    local = models["local"]["imagegate"]
    assert local["default"] is True and local["max_n"] == 10
    assert local["sizes"] == ["auto", "1k", "2k", "4k"] and local["size_range"] == [1, 4096]
    assert [name for name, model in models.items() if model["imagegate"]["default"]] == ["local"]
    assert client.get("/v1/models/fake-grok").get_json() == models["fake-grok"]
    assert_error(client.get("/v1/models/no-such-model"), 404, "model", "model_not_found")
    assert_error(client.get("/v1/models/vendor/no-such-model"), 404, "model", "model_not_found")


def test_a_key_limited_to_some_models_sees_and_uses_only_those(new_client, count_tasks, sessions):
    from imagegate.app.keys import update_key

    client = new_client(models=["fake-grok", "fake-dalle"])
    assert [model["id"] for model in client.get("/v1/models").get_json()["data"]] == ["fake-dalle", "fake-grok"]
    assert client.get("/v1/models/fake-grok").status_code == 200
    assert_error(client.get("/v1/models/local"), 404, "model", "model_not_found")

    before = count_tasks()
    refused = client.post("/v1/images/generations", json={"model": "local", "prompt": "x", "async": True})
    unknown = client.post("/v1/images/generations", json={"model": "no-such", "prompt": "x", "async": True})
    assert_error(refused, 404, "model", "model_not_found")
    assert_error(unknown, 404, "model", "model_not_found")
    assert refused.get_json()["error"]["type"] == unknown.get_json()["error"]["type"]
    batch = client.post(
        "/v1/images/batches",
        json={"requests": [{"custom_id": "a", "body": {"model": "fake-grok", "prompt": "x"}},
                           {"custom_id": "b", "body": {"model": "local", "prompt": "x"}}]},
    )  # fmt: skip
    assert_error(batch, 400, "requests", "invalid_batch")
    assert [(line["custom_id"], line["param"]) for line in batch.get_json()["error"]["lines"]] == [("b", "body.model")]
    assert count_tasks() == before

    # No model named: the first model of the file this key may use.
    task_id = submit(client)
    assert client.get(f"/v1/images/{task_id}").get_json()["model"] == "fake-dalle"
    assert client.get("/v1/models/fake-dalle").get_json()["imagegate"]["default"] is True

    assert update_key(sessions, client.key_name, models=None)
    assert len(client.get("/v1/models").get_json()["data"]) > 2
    assert submit(client, model="local")


# -- /v1/usage --------------------------------------------------------------------------------
def test_usage_counts_the_keys_tasks_grouped(new_client):
    client, other = new_client(), new_client()
    submit(client, model="local", n=2)
    submit(client, model="local")
    cancelled = submit(client, model="fake-grok", n=3)
    client.post(f"/v1/images/{cancelled}/cancel")
    submit(other, model="local")

    whole = client.get("/v1/usage").get_json()
    assert whole["object"] == "list" and whole["group_by"] == []
    (total,) = whole["data"]
    assert (total["tasks"], total["succeeded"], total["failed"], total["unfinished"]) == (3, 0, 1, 2)
    assert total["images"] == 0
    assert total["usage"] == {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0, "generated_images": 0}
    assert whole["end"] - whole["start"] == 30 * 86400

    by_model = client.get("/v1/usage", query_string={"group_by": "model"}).get_json()["data"]
    assert [(row["model"], row["tasks"], row["failed"]) for row in by_model] == [("fake-grok", 1, 1), ("local", 2, 0)]
    today = datetime.now(UTC).date().isoformat()
    by_day = client.get("/v1/usage", query_string={"group_by": "day,model"}).get_json()["data"]
    assert [(row["day"], row["model"]) for row in by_day] == [(today, "fake-grok"), (today, "local")]
    by_key = client.get("/v1/usage", query_string={"group_by": "api_key"}).get_json()["data"]
    assert [(row["api_key_name"], row["tasks"]) for row in by_key] == [(client.key_name, 3)]

    later = {"start": int(time.time()) + 60, "end": int(time.time()) + 120}
    (empty,) = client.get("/v1/usage", query_string=later).get_json()["data"]
    assert empty["tasks"] == 0


@pytest.mark.parametrize(
    "query,status,param,code",
    [
        ({"group_by": "week"}, 400, "group_by", "invalid_value"),
        ({"start": "soon"}, 400, "start", "invalid_value"),
        ({"start": 2000, "end": 1000}, 400, "start", "invalid_value"),
        ({"end": "0001-01-02T00:00:00Z"}, 400, "end", "invalid_value"),
        ({"api_key": "someone-else"}, 403, "api_key", "admin_only"),
        ({"colour": "red"}, 400, "colour", "unknown_parameter"),
    ],
)
def test_bad_usage_parameters(new_client, query, status, param, code):
    assert_error(new_client().get("/v1/usage", query_string=query), status, param, code)


def test_the_admin_token_sees_every_keys_usage(app, new_client):
    first, second = new_client(), new_client()
    submit(first)
    submit(second)
    submit(second)
    admin = app.test_client()
    admin.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {ADMIN_TOKEN}"
    rows = admin.get("/v1/usage", query_string={"group_by": "api_key"}).get_json()["data"]
    tasks = {row["api_key_name"]: row["tasks"] for row in rows}
    assert tasks[first.key_name] == 1 and tasks[second.key_name] == 2
    (one,) = admin.get("/v1/usage", query_string={"api_key": second.key_name}).get_json()["data"]
    assert one["tasks"] == 2
    assert_error(admin.get("/v1/usage", query_string={"api_key": "no-such-key"}), 404, "api_key", "api_key_not_found")
    # The admin token is not an API key: it reads usage only.
    assert_error(admin.get("/v1/images"), 401, None, "invalid_api_key")
    wrong = app.test_client().get("/v1/usage", headers={"Authorization": "Bearer admin-wrong"})
    assert_error(wrong, 401, None, "invalid_api_key")


# -- the stores, on Postgres and on the embedded mode's SQLite ---------------------------------
@pytest.fixture(params=["postgres", "sqlite"])
def any_database(request, database_url, migrated, tmp_path):
    if request.param == "postgres":
        yield database_url
        return
    from imagegate.app.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'embedded.db'}"
    upgrade(url)
    yield url


def test_succeeded_tasks_are_listed_counted_and_deleted_on_either_database(any_database):
    from imagegate.app.stores.attempts import AttemptStore, CallOutcome, NewImage, Success
    from imagegate.app.stores.listing import ListFilter, list_tasks
    from imagegate.app.stores.tasks import TaskStore
    from imagegate.app.stores.usage import UsageFilter, usage_totals

    engine = make_engine(any_database, pool_size=1)
    sessions = make_sessionmaker(engine)
    key_id = authenticate(sessions, create_key(sessions, f"stores-{uuid.uuid4().hex[:8]}").key).id
    tasks, attempts = TaskStore(sessions), AttemptStore(engine)
    # The upstreams' usage: numbers are summed, anything else is not counted.
    usages = [
        {"total_tokens": 100, "input_tokens": 10, "output_tokens": 90},
        {"generated_images": 2, "total_tokens": "lots", "input_tokens": None, "odd": {"nested": 1}},
    ]
    ids = []
    for n, usage in zip((1, 2), usages, strict=True):
        task, _ = tasks.create(
            api_key_id=key_id, model="local", request={"prompt": "p", "n": n}, response_format="b64_json"
        )
        claim = attempts.claim(task.id, 1, worker="test", lease_s=60, plan=lambda claim, done: [0])
        images = [NewImage(b"\x89PNG", "image/png") for _ in range(n)]
        assert attempts.succeed_many([Success(claim, images, usage, [CallOutcome(0)])]) == [True]
        ids.append(task.id)
    tasks.create(api_key_id=key_id, model="other", request={"prompt": "p"}, response_format="url")

    page = list_tasks(engine, ListFilter(api_key_id=key_id, status="succeed"), limit=1)
    assert [record.task.id for record in page.records] == [ids[1]] and page.has_more
    assert [image.data for image in page.records[0].images] == [None, None]  # never the bytes
    page = list_tasks(engine, ListFilter(api_key_id=key_id, status="succeed"), limit=1, after=ids[1])
    assert [record.task.id for record in page.records] == [ids[0]] and not page.has_more

    window = UsageFilter(start=datetime.now(UTC) - timedelta(hours=1), end=datetime.now(UTC), api_key_ids=[key_id])
    by_model = usage_totals(engine, UsageFilter(**vars(window) | {"groups": ["day", "model"]}))
    today = datetime.now(UTC).date().isoformat()
    assert [(row.group, row.tasks, row.succeeded, row.unfinished, row.images) for row in by_model] == [
        ({"day": today, "model": "local"}, 2, 2, 0, 3),
        ({"day": today, "model": "other"}, 1, 0, 1, 0),
    ]
    assert by_model[0].usage == {"input_tokens": 10, "output_tokens": 90, "total_tokens": 100, "generated_images": 2}

    deleted = tasks.delete(ids[1], key_id)
    assert deleted.cancelled is None  # it had ended
    record = tasks.get(ids[1], api_key_id=key_id, with_bytes=True)
    assert record.task.deleted and record.task.status == "succeed" and record.images == []
    assert record.task.usage == usages[1]
    (total,) = usage_totals(engine, window)
    assert (total.tasks, total.images, total.usage["generated_images"]) == (3, 3, 2)  # a deletion keeps the count
    engine.dispose()
