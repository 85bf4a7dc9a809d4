"""The image store's backends, and the stores around them, on real parts: files in a directory, an
S3-compatible HTTP server (moto's server mode, spoken to by boto3 over HTTP), and a Postgres
database of this module's own (retention picks among every ended task, so no other test's)."""

from __future__ import annotations

import base64
import uuid
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import select, update

from imagegate.app.db import make_engine, make_sessionmaker
from imagegate.app.image_store import DirectoryImages, S3Images, image_key
from imagegate.app.image_urls import signed_image_url
from imagegate.app.keys import create_key, hash_key
from imagegate.app.migrate import upgrade
from imagegate.app.models import ApiKey, Image, Task, utcnow
from imagegate.app.runtime import build_runtime
from imagegate.app.state.refused import Refused
from imagegate.app.stores.attempts import AttemptStore, NewImage, Success
from imagegate.app.stores.images import ImageRecords
from imagegate.app.stores.tasks import TaskStore
from imagegate.app.sweeper import Sweeper
from imagegate.app.web import create_app
from imagegate.workers.images import discard_unwritten, put_images
from tests.state.rows import make_task, new_key
from tests.support.databases import drop_database, fresh_database
from tests.support.s3 import CREDENTIALS, start_s3

PNG = b"\x89PNG\r\n\x1a\n" + b"imagegate" * 40


def png(tag: str) -> bytes:
    return PNG + tag.encode()


# -- the backends --------------------------------------------------------------------------------
def test_the_directory_store_puts_gets_and_deletes_files(tmp_path):
    store = DirectoryImages(tmp_path / "images")
    task_id, image_id = uuid.uuid4(), uuid.uuid4()
    key = image_key(task_id, image_id, "image/png")
    assert key == f"{task_id}/{image_id}.png"
    store.put(key, png("a"), "image/png")
    assert (tmp_path / "images" / key).read_bytes() == png("a")
    assert store.get(key) == png("a")
    assert [path.name for path in (tmp_path / "images" / str(task_id)).iterdir()] == [f"{image_id}.png"]  # no temp
    store.delete([key, f"{task_id}/{uuid.uuid4()}.png"])  # a key with nothing under it is no error
    assert store.get(key) is None
    assert not (tmp_path / "images" / str(task_id)).exists()  # the task's directory went with its last image
    with pytest.raises(ValueError):
        store.get("../../etc/passwd")
    assert store.url(key, "image/png", 60) is None


@pytest.fixture(scope="module")
def s3():
    server = start_s3()
    yield server
    server.stop()


@pytest.fixture
def aws_env(monkeypatch):
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)


def test_the_s3_store_against_a_real_s3_server(s3, aws_env):
    bucket = s3.make_bucket(f"images-{uuid.uuid4().hex[:8]}")
    store = S3Images(bucket, prefix="gateway/", endpoint_url=s3.endpoint_url)
    key = image_key(uuid.uuid4(), uuid.uuid4(), "image/png")
    store.put(key, png("s3"), "image/png")
    assert s3.objects(bucket) == {f"gateway/{key}": png("s3")}
    assert store.get(key) == png("s3")
    assert store.get("missing/nothing.png") is None

    url = store.url(key, "image/png", 120)
    assert url.startswith(f"{s3.endpoint_url}/{bucket}/gateway/{key}?") and "X-Amz-Signature=" in url
    fetched = httpx.get(url)  # no credentials: the signature in the URL is the permission
    assert fetched.status_code == 200 and fetched.content == png("s3")
    assert fetched.headers["content-type"] == "image/png"
    assert "X-Amz-Expires=120&" in url  # (moto does not check signatures; AWS and MinIO do)

    store.delete([key, "missing/nothing.png"])
    assert store.get(key) is None and s3.objects(bucket) == {}


# -- a database of this module's own ------------------------------------------------------------
@pytest.fixture(scope="module")
def database(postgres_url):
    url = fresh_database(postgres_url)
    upgrade(url)
    engine = make_engine(url, pool_size=4, pre_ping=False)
    yield url, engine
    engine.dispose()
    drop_database(url)


@pytest.fixture(scope="module")
def engine(database):
    return database[1]


@pytest.fixture
def files(tmp_path):
    return DirectoryImages(tmp_path / "images")


def every_slot(claim, done):
    return list(range(claim.request["n"]))


def succeed(engine, files, key_id, *tags: str, finished_ago_s: float = 0) -> uuid.UUID:
    """A task through the worker's path: claimed, its images put in the store, then its success."""
    attempts = AttemptStore(engine)
    claim = attempts.claim(make_task(engine, key_id, n=len(tags)), 1, worker="w", lease_s=60, plan=every_slot)
    images = put_images(files, claim.task_id, [NewImage(png(tag), "image/png", slot=i) for i, tag in enumerate(tags)])
    assert attempts.succeed_many([Success(claim, images, None, [])]) == [True]
    if finished_ago_s:
        with engine.begin() as connection:
            connection.execute(
                update(Task)
                .where(Task.id == claim.task_id)
                .values(finished_at=utcnow() - timedelta(seconds=finished_ago_s))
            )
    return claim.task_id


def image_rows(engine, task_id):
    with engine.connect() as connection:
        return connection.execute(select(Image.__table__).where(Image.task_id == task_id)).all()


def test_a_success_puts_the_bytes_first_and_its_rows_point_at_them(engine, files):
    key_id = new_key(engine)
    task_id = succeed(engine, files, key_id, "one", "two")
    rows = image_rows(engine, task_id)
    assert [row.data for row in rows] == [None, None]
    assert {files.get(row.store_key) for row in rows} == {png("one"), png("two")}
    tasks = TaskStore(make_sessionmaker(engine), files)
    record = tasks.get(task_id, with_bytes=True)
    assert [image.data for image in record.images] == [png("one"), png("two")]
    assert tasks.image(record.images[0].id) == ("image/png", png("one"))  # what the signed URL serves


def test_a_refused_success_takes_back_the_bytes_it_put(engine, files):
    attempts = AttemptStore(engine)
    claim = attempts.claim(make_task(engine, new_key(engine)), 1, worker="w", lease_s=60, plan=every_slot)
    images = put_images(files, claim.task_id, [NewImage(png("late"), "image/png")])
    assert files.get(images[0].key) == png("late")
    with engine.begin() as connection:  # the sweeper took the attempt back meanwhile
        connection.execute(update(Task).where(Task.id == claim.task_id).values(status="pending", attempts=1))
    assert attempts.succeed_many([Success(claim, images, None, [])]) == [Refused.STALE_ATTEMPT]
    discard_unwritten(files, attempts, images)
    assert files.get(images[0].key) is None


def test_bytes_whose_rows_were_written_are_kept_when_a_retry_of_the_write_is_refused(engine, files):
    """A commit whose reply was lost: the write is retried, refused (it happened), and the bytes stay."""
    task_id = succeed(engine, files, new_key(engine), "kept")
    (row,) = image_rows(engine, task_id)
    written = NewImage(png("kept"), "image/png", id=row.id, key=row.store_key)
    discard_unwritten(files, AttemptStore(engine), [written])
    assert files.get(row.store_key) == png("kept")


def test_retention_deletes_the_bytes_of_the_oldest_ended_tasks_a_batch_at_a_time(engine, files):
    key_id = new_key(engine)
    old = [succeed(engine, files, key_id, f"old{i}", finished_ago_s=3600 * (10 - i)) for i in range(3)]
    recent = succeed(engine, files, key_id, "recent", finished_ago_s=60)
    running = make_task(engine, key_id, status="running", attempts=1)
    old_keys = [row.store_key for task_id in old for row in image_rows(engine, task_id)]
    records = ImageRecords(engine, files)

    cutoff = utcnow() - timedelta(seconds=1800)
    first = records.expire_ended_before(cutoff, limit=2)
    assert (first.tasks, first.images) == (2, 2)
    assert [files.get(key) for key in old_keys] == [None, None, png("old2")]  # the two oldest ends first
    second = records.expire_ended_before(cutoff, limit=2)
    assert (second.tasks, second.images) == (1, 1)
    assert records.expire_ended_before(cutoff, limit=2).tasks == 0  # nothing left: a pass costs one read

    assert all(image_rows(engine, task_id) == [] for task_id in old)
    assert files.get(image_rows(engine, recent)[0].store_key) == png("recent")
    with engine.connect() as connection:
        marked = dict(
            connection.execute(select(Task.id, Task.images_expired_at).where(Task.api_key_id == key_id)).all()
        )
    assert all(marked[task_id] is not None for task_id in old)
    assert marked[recent] is None and marked[running] is None


def test_the_retention_sweep_uses_the_partial_index(engine):
    with engine.connect() as connection:
        connection.exec_driver_sql("SET enable_seqscan = off")
        plan = "\n".join(
            connection.exec_driver_sql(
                "EXPLAIN SELECT id FROM tasks WHERE images_expired_at IS NULL AND finished_at IS NOT NULL "
                "AND finished_at < now() ORDER BY finished_at LIMIT 100"
            ).scalars()
        )
    assert "ix_tasks_finished_at_images_kept" in plan, plan


def test_deleting_a_tasks_images_removes_bytes_and_rows_and_keeps_the_task(engine, files):
    task_id = succeed(engine, files, new_key(engine), "a", "b")
    keys = [row.store_key for row in image_rows(engine, task_id)]
    assert ImageRecords(engine, files).delete_for_tasks([task_id]) == 2
    assert [files.get(key) for key in keys] == [None, None] and image_rows(engine, task_id) == []
    with engine.connect() as connection:
        status, expired = connection.execute(
            select(Task.status, Task.images_expired_at).where(Task.id == task_id)
        ).one()
    assert (status, expired) == ("succeed", None)
    assert ImageRecords(engine, files).delete_for_tasks([task_id]) == 0  # again: nothing, no error


def test_an_expired_task_answers_empty_data_and_expired_and_a_kept_one_serves_its_bytes(
    database, settings, redis_dbs, tmp_path
):
    url, engine = database
    configured = settings.model_copy(
        update={
            "database_url": url,
            "broker_url": redis_dbs[1],
            "image_store": "dir",
            "image_dir": tmp_path / "images",
            "image_retention_s": 3600,
            "image_retention_batch": 5,
        }
    )
    files = DirectoryImages(tmp_path / "images")
    key = create_key(make_sessionmaker(engine), f"expiry-{uuid.uuid4().hex[:8]}")
    with engine.connect() as connection:
        key_id = connection.scalar(select(ApiKey.id).where(ApiKey.key_hash == hash_key(key.key)))
    old = succeed(engine, files, key_id, "old", finished_ago_s=7200)
    kept = succeed(engine, files, key_id, "kept", finished_ago_s=60)

    report = Sweeper(build_runtime(configured, pool_size=2)).sweep_once()
    assert report.images_expired == 1

    client = create_app(configured).test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {key.key}"
    expired = client.get(f"/v1/images/{old}").get_json()
    assert (expired["task_status"], expired["data"], expired["expired"]) == ("succeed", [], True)
    alive = client.get(f"/v1/images/{kept}").get_json()
    assert "expired" not in alive
    assert base64.b64decode(alive["data"][0]["b64_json"]) == png("kept")  # read from the directory

    (row,) = image_rows(engine, kept)  # the gateway's signed URL reads through the store too
    signed = signed_image_url("http://gateway", configured.secret_key, row.id, "image/png", 60)
    served = client.get(signed.removeprefix("http://gateway"))
    assert served.status_code == 200 and served.data == png("kept")
    (row,) = image_rows(engine, kept)
    files.delete([row.store_key])  # bytes gone (deleted under a reader): a 404, never a 500
    assert client.get(signed.removeprefix("http://gateway")).status_code == 404
