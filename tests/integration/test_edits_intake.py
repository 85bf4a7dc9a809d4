"""POST /v1/images/edits at intake, through create_app with the Flask test client on real Postgres
and a Redis db index no worker consumes: what is stored with the task, what is refused (nothing
stored, nothing queued), Idempotency-Key, the sweeper's clean-up, and the OpenAPI document."""

from __future__ import annotations

import hashlib
import io
import json

import pytest
import redis
from PIL import Image
from sqlalchemy import create_engine, func, select, text

from imagegate.app.models import TaskInput
from imagegate.app.queue import QUEUE
from imagegate.app.stores.inputs import forget_ended
from imagegate.app.web import create_app

MAX_FILE = 3000  # IMAGEGATE_MAX_INPUT_IMAGE_BYTES of this module's app
MAX_IMAGES = 3


def png(width: int = 4, height: int = 4, alpha: int = 255) -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", (width, height), (200, 10, 10, alpha)).save(out, format="PNG")
    return out.getvalue()


def encoded(fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(out, format=fmt)
    return out.getvalue()


def noise(size: int) -> bytes:
    """A PNG larger than `size` bytes (random pixels do not compress)."""
    side = int(size**0.5) + 8
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), hashlib.shake_256(b"x").digest(side * side * 3)).save(out, format="PNG")
    assert len(out.getvalue()) > size
    return out.getvalue()


@pytest.fixture(scope="module")
def edit_settings(settings, redis_dbs, tmp_path_factory):
    providers = tmp_path_factory.mktemp("edits") / "providers.toml"
    providers.write_text("""
[models."local"]
adapter = "local"

[models."dalle3"]
adapter = "openai"
base_url = "http://127.0.0.1:9/v1"
family = "dall-e-3"

[models."dalle2"]
adapter = "openai"
base_url = "http://127.0.0.1:9/v1"
family = "dall-e-2"

[models."no-edits"]
adapter = "openai"
base_url = "http://127.0.0.1:9/v1"
edits = false
""")
    return settings.model_copy(
        update={
            "broker_url": redis_dbs[1],
            "providers_file": providers,
            "max_input_image_bytes": MAX_FILE,
            "max_input_images": MAX_IMAGES,
        }
    )


@pytest.fixture(scope="module")
def http(edit_settings, migrated, api_key):
    client = create_app(edit_settings).test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {api_key}"
    return client


@pytest.fixture(scope="module")
def engine(database_url):
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def queued(edit_settings):
    queue = redis.Redis.from_url(edit_settings.broker_url)
    queue.delete(QUEUE)
    return lambda: queue.llen(QUEUE)


def stored_inputs(engine) -> int:
    with engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(TaskInput)).scalar_one()


def post_edit(http, fields: dict, files: dict | None = None, **kwargs):
    """A multipart POST: `files` maps a field to one (bytes, filename) or a list of them."""
    data: dict = dict(fields)
    for name, given in (files or {}).items():
        parts = given if isinstance(given, list) else [given]
        data[name] = [(io.BytesIO(content), filename) for content, filename in parts]
    return http.post("/v1/images/edits", data=data, content_type="multipart/form-data", **kwargs)


def test_an_edit_is_stored_with_its_files_beside_the_task_and_queued(http, engine, queued):
    image, mask = png(), png(alpha=0)
    reply = post_edit(
        http,
        {"prompt": "add a hat", "model": "local", "n": "2", "size": "64x64", "async": "true", "retries": "1"},
        {"image": (image, "cat.png"), "mask": (mask, "mask.png")},
    )
    assert reply.status_code == 202, reply.get_json()
    body = reply.get_json()
    assert body["task_status"] == "pending" and body["data"] == []
    assert queued() == 1
    with engine.connect() as connection:
        request = connection.execute(text("SELECT request FROM tasks WHERE id = :id"), {"id": body["task_id"]}).scalar()
        rows = connection.execute(
            text("SELECT role, index, content_type, filename, data FROM task_inputs WHERE task_id = :id ORDER BY role"),
            {"id": body["task_id"]},
        ).all()
    request = request if isinstance(request, dict) else json.loads(request)
    # The task's request says what the files were; the bytes are only in task_inputs.
    assert request == {
        "prompt": "add a hat",
        "model": "local",
        "n": 2,
        "size": "64x64",
        "async": True,
        "retries": 1,
        "edit": {
            "images": [
                {
                    "content_type": "image/png",
                    "bytes": len(image),
                    "sha256": hashlib.sha256(image).hexdigest(),
                    "filename": "cat.png",
                }
            ],
            "mask": {
                "content_type": "image/png",
                "bytes": len(mask),
                "sha256": hashlib.sha256(mask).hexdigest(),
                "filename": "mask.png",
            },
        },
    }
    assert [(row.role, row.index, row.content_type, row.filename, bytes(row.data)) for row in rows] == [
        ("image", 0, "image/png", "cat.png", image),
        ("mask", 0, "image/png", "mask.png", mask),
    ]


def test_several_images_keep_their_order_whether_sent_as_image_or_image_brackets(http, engine):
    images = [png(4, 4), encoded("JPEG"), encoded("WEBP")]
    for field in ("image", "image[]"):
        reply = post_edit(
            http,
            {"prompt": "merge them", "model": "local", "async": "true"},
            {field: [(content, f"{n}.bin") for n, content in enumerate(images)]},
        )
        assert reply.status_code == 202, reply.get_json()
        with engine.connect() as connection:
            rows = connection.execute(
                text("SELECT content_type, data FROM task_inputs WHERE task_id = :id ORDER BY index"),
                {"id": reply.get_json()["task_id"]},
            ).all()
        assert [bytes(row.data) for row in rows] == images
        assert [row.content_type for row in rows] == ["image/png", "image/jpeg", "image/webp"]


REFUSED = [
    # (fields, files, status, param, code)
    ({"model": "local"}, {"image": (png(), "a.png")}, 400, "prompt", "missing_required_parameter"),
    ({"prompt": "x", "model": "local"}, {}, 400, "image", "missing_required_parameter"),
    ({"prompt": "x"}, {"image": (b"hello, world", "a.png")}, 400, "image", "invalid_image_format"),
    ({"prompt": "x"}, {"image": (encoded("GIF"), "a.gif")}, 400, "image", "invalid_image_format"),
    ({"prompt": "x"}, {"image": (b"\x89PNG\r\n\x1a\n" + b"junk" * 10, "a.png")}, 400, "image", "invalid_image_format"),
    ({"prompt": "x"}, {"image": (b"", "a.png")}, 400, "image", "invalid_image_format"),
    ({"prompt": "x"}, {"image": (png(), "a.png"), "mask": (encoded("JPEG"), "m.jpg")}, 400, "mask", None),
    ({"prompt": "x"}, {"image": (png(4, 4), "a.png"), "mask": (png(8, 8), "m.png")}, 400, "mask", "invalid_value"),
    ({"prompt": "x"}, {"image": [(png(), "a.png")] * 4}, 400, "image", "too_many_images"),
    ({"prompt": "x"}, {"image": (noise(MAX_FILE), "big.png")}, 413, "image", "image_too_large"),
    ({"prompt": "x"}, {"image": (png(), "a.png"), "mask": (noise(MAX_FILE), "m.png")}, 413, "mask", "image_too_large"),
    ({"prompt": "x", "n": "0"}, {"image": (png(), "a.png")}, 400, "n", "invalid_value"),
    ({"prompt": "x", "n": "two"}, {"image": (png(), "a.png")}, 400, "n", "invalid_value"),
    ({"prompt": "x", "stream": "true"}, {"image": (png(), "a.png")}, 400, "stream", "invalid_value"),
    ({"prompt": "x", "size": "huge"}, {"image": (png(), "a.png")}, 400, "size", "invalid_value"),
    ({"prompt": "x", "colour": "red"}, {"image": (png(), "a.png")}, 400, "colour", "unknown_parameter"),
    ({"prompt": "x", "image": "https://x.example/a.png"}, {}, 400, "image", "invalid_value"),
    ({"image": "x"}, {"prompt": (b"a file", "p.txt")}, 400, "prompt", "invalid_value"),
    ({"prompt": "x", "model": "nope"}, {"image": (png(), "a.png")}, 404, "model", "model_not_found"),
    ({"prompt": "x", "model": "dalle3"}, {"image": (png(), "a.png")}, 400, "model", "invalid_value"),
    ({"prompt": "x", "model": "no-edits"}, {"image": (png(), "a.png")}, 400, "model", "invalid_value"),
    ({"prompt": "x", "model": "dalle2"}, {"image": [(png(), "a.png")] * 2}, 400, "image", "invalid_value"),
    ({"prompt": "x", "model": "dalle2", "size": "1792x1024"}, {"image": (png(), "a.png")}, 400, "size", None),
]


@pytest.mark.parametrize(("fields", "files", "status", "param", "code"), REFUSED)
def test_a_refused_edit_stores_and_queues_nothing(
    http, engine, queued, count_tasks, fields, files, status, param, code
):
    before = (count_tasks(), stored_inputs(engine))
    reply = post_edit(http, fields, files)
    assert reply.status_code == status, reply.get_json()
    error = reply.get_json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param
    if code:
        assert error["code"] == code
    assert (count_tasks(), stored_inputs(engine)) == before and queued() == 0


def test_the_size_limits_are_said_in_the_refusal(http):
    error = post_edit(http, {"prompt": "x"}, {"image": (noise(MAX_FILE), "big.png")}).get_json()["error"]
    assert f"larger than {MAX_FILE} bytes" in error["message"] and "big.png" in error["message"]
    error = post_edit(http, {"prompt": "x"}, {"image": [(png(), "a.png")] * 4}).get_json()["error"]
    assert f"At most {MAX_IMAGES} input images" in error["message"]


def test_a_body_past_the_body_limit_is_413_in_openai_shape(http, edit_settings):
    big = b"\x89PNG\r\n\x1a\n" + b"\0" * edit_settings.max_body_bytes
    reply = post_edit(http, {"prompt": "x"}, {"image": (big, "a.png")})
    assert reply.status_code == 413 and reply.get_json()["error"]["code"] == "request_too_large"


def test_a_json_body_is_refused_naming_multipart(http, count_tasks):
    before = count_tasks()
    reply = http.post("/v1/images/edits", json={"prompt": "x", "image": "aGk="})
    assert reply.status_code == 400
    error = reply.get_json()["error"]
    assert error["param"] == "Content-Type" and "multipart/form-data" in error["message"]
    assert count_tasks() == before


def test_an_idempotency_key_gives_the_same_task_for_the_same_files_and_refuses_other_files(http, engine):
    key = {"Idempotency-Key": f"edit-{hashlib.sha256(png()).hexdigest()[:12]}-{id(http)}"}
    fields = {"prompt": "same", "model": "local", "async": "true"}
    first = post_edit(http, fields, {"image": (png(), "a.png")}, headers=key)
    again = post_edit(http, fields, {"image": (png(), "a.png")}, headers=key)
    assert first.status_code == again.status_code == 202
    assert first.get_json()["task_id"] == again.get_json()["task_id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    with engine.connect() as connection:
        count = connection.execute(
            text("SELECT count(*) FROM task_inputs WHERE task_id = :id"), {"id": first.get_json()["task_id"]}
        ).scalar_one()
    assert count == 1  # the replay stored no second copy
    other = post_edit(http, fields, {"image": (png(6, 6), "a.png")}, headers=key)
    assert other.status_code == 422 and other.get_json()["error"]["code"] == "idempotency_key_reused"


def test_the_files_of_an_ended_edit_are_deleted_by_the_sweeper_and_a_live_ones_kept(http, engine):
    submit = {"prompt": "to cancel", "model": "local", "async": "true"}
    ended = post_edit(http, submit, {"image": (png(), "a.png"), "mask": (png(alpha=0), "m.png")}).get_json()["task_id"]
    live = post_edit(http, submit, {"image": (png(), "a.png")}).get_json()["task_id"]
    assert http.post(f"/v1/images/{ended}/cancel").get_json()["task_status"] == "failed"
    while forget_ended(engine, limit=1):  # a bounded number per pass, until none is left
        pass
    with engine.connect() as connection:
        left = dict(
            connection.execute(
                text("SELECT CAST(task_id AS TEXT), count(*) FROM task_inputs WHERE task_id IN (:a, :b) GROUP BY 1"),
                {"a": ended, "b": live},
            ).all()
        )
    assert left == {live: 1}


def test_the_openapi_document_describes_the_multipart_edit(http):
    document = http.get("/openapi.json").get_json()
    operation = document["paths"]["/v1/images/edits"]["post"]
    assert operation["operationId"] == "createImageEdit"
    schema = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"image", "image[]", "mask", "prompt", "n", "size", "response_format", "model", "async"} <= set(
        schema["properties"]
    )
    assert schema["required"] == ["prompt"]
    assert schema["properties"]["mask"]["contentMediaType"] == "application/octet-stream"
    assert {"200", "202", "400", "413"} <= set(operation["responses"])
    assert any(parameter["name"] == "Idempotency-Key" for parameter in operation["parameters"])
