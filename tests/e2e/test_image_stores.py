"""End to end with the image bytes outside Postgres: a real `imagegate worker` stores them in an S3
bucket (moto's S3 server, spoken to over HTTP) or a directory, and a real `imagegate api` serves
them as b64, as the gateway's signed URLs and as the bucket's presigned URLs; `imagegate images
purge` deletes them. Each stack has its own database and broker lane: purge reaches every task."""

from __future__ import annotations

import base64
import io
import uuid
from pathlib import Path

import httpx
import pytest
from PIL import Image
from sqlalchemy import create_engine, select

from imagegate.app.migrate import upgrade
from imagegate.app.models import Image as ImageRow
from tests.support.databases import drop_database, fresh_database
from tests.support.flows import submit_async, wait_for_end
from tests.support.processes import create_key, run_cli, start_api, start_worker, stop_process
from tests.support.s3 import CREDENTIALS, start_s3
from tests.support.services import free_port, start_redis

pytestmark = pytest.mark.e2e


class Stack:
    def __init__(self, env: dict[str, str], directory: Path):
        self.env, self.directory = env, directory
        self.port = free_port()
        self.env["IMAGEGATE_PUBLIC_URL"] = f"http://127.0.0.1:{self.port}"
        self.worker = start_worker(env, directory / "worker.log", concurrency=4)
        self.api = start_api(env, directory / "api.log", self.port)
        self.client = httpx.Client(
            base_url=f"http://127.0.0.1:{self.port}",
            headers={"Authorization": f"Bearer {create_key(env, 'stores')}"},
            timeout=60,
        )

    def rows(self, task_id: str):
        engine = create_engine(self.env["IMAGEGATE_DATABASE_URL"])
        try:
            with engine.connect() as connection:
                return connection.execute(
                    select(ImageRow.data, ImageRow.store_key)
                    .where(ImageRow.task_id == uuid.UUID(task_id))
                    .order_by(ImageRow.slot, ImageRow.index)
                ).all()
        finally:
            engine.dispose()

    def stop(self) -> None:
        self.client.close()
        stop_process(self.api)
        stop_process(self.worker)


@pytest.fixture(scope="module")
def broker():
    server = start_redis()
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def own_database(postgres_url):
    """A factory of migrated databases, dropped at the end of the module."""
    made = []

    def make() -> str:
        made.append(fresh_database(postgres_url))
        upgrade(made[-1])
        return made[-1]

    yield make
    for database in made:
        drop_database(database)


def stack_env(env, database: str, broker: str, **settings: str) -> dict[str, str]:
    return env | {"IMAGEGATE_DATABASE_URL": database, "IMAGEGATE_BROKER_URL": broker} | settings


@pytest.fixture(scope="module")
def s3():
    server = start_s3()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def s3_stack(env, own_database, broker, s3, tmp_path_factory):
    bucket = s3.make_bucket(f"imagegate-{uuid.uuid4().hex[:8]}")
    stack = Stack(
        stack_env(
            env,
            own_database(),
            f"{broker}/1",
            IMAGEGATE_IMAGE_STORE="s3",
            IMAGEGATE_S3_ENDPOINT_URL=s3.endpoint_url,
            IMAGEGATE_S3_BUCKET=bucket,
            IMAGEGATE_S3_PREFIX="images/",
            IMAGEGATE_IMAGE_URLS="store",
            **CREDENTIALS,
        ),
        tmp_path_factory.mktemp("s3-stack"),
    )
    stack.bucket = bucket
    yield stack
    stack.stop()


def test_a_worker_stores_in_s3_and_the_api_serves_b64_from_it(s3_stack, s3):
    response = s3_stack.client.post(
        "/v1/images/generations",
        json={"model": "local", "prompt": "a bucket", "size": "48x32", "n": 2, "response_format": "b64_json"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    served = [base64.b64decode(item["b64_json"]) for item in body["data"]]
    assert [Image.open(io.BytesIO(data)).size for data in served] == [(48, 32)] * 2

    rows = s3_stack.rows(body["task_id"])
    assert [row.data for row in rows] == [None, None]  # not in Postgres
    objects = s3.objects(s3_stack.bucket)
    assert [objects[f"images/{row.store_key}"] for row in rows] == served
    assert all(row.store_key.startswith(f"{body['task_id']}/") for row in rows)
    again = s3_stack.client.get(f"/v1/images/{body['task_id']}").json()  # GET reads the bucket too
    assert [base64.b64decode(item["b64_json"]) for item in again["data"]] == served


def test_url_answers_are_the_buckets_presigned_urls(s3_stack, s3):
    task_id = submit_async(s3_stack.client, model="local", prompt="presigned", size="40x40", response_format="url")
    body = wait_for_end(s3_stack.client, task_id)
    assert body["task_status"] == "succeed", body
    url = body["data"][0]["url"]
    assert url.startswith(f"{s3.endpoint_url}/{s3_stack.bucket}/images/{task_id}/") and "X-Amz-Signature=" in url
    fetched = httpx.get(url)  # no key, no gateway: straight from the bucket
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(fetched.content)).size == (40, 40)
    (row,) = s3_stack.rows(task_id)
    assert s3.objects(s3_stack.bucket)[f"images/{row.store_key}"] == fetched.content


@pytest.fixture(scope="module")
def dir_stack(env, own_database, broker, tmp_path_factory):
    directory = tmp_path_factory.mktemp("dir-stack")
    stack = Stack(
        stack_env(
            env,
            own_database(),
            f"{broker}/2",
            IMAGEGATE_IMAGE_STORE="dir",
            IMAGEGATE_IMAGE_DIR=str(directory / "images"),
        ),
        directory,
    )
    yield stack
    stack.stop()


def test_a_worker_stores_in_a_directory_and_the_gateway_url_reads_it(dir_stack):
    task_id = submit_async(dir_stack.client, model="local", prompt="on disk", size="24x24", response_format="url")
    body = wait_for_end(dir_stack.client, task_id)
    assert body["task_status"] == "succeed", body
    (row,) = dir_stack.rows(task_id)
    assert row.data is None
    on_disk = (dir_stack.directory / "images" / row.store_key).read_bytes()
    url = body["data"][0]["url"]
    assert url.startswith(dir_stack.env["IMAGEGATE_PUBLIC_URL"] + "/files/images/")
    fetched = httpx.get(url)
    assert fetched.status_code == 200 and fetched.content == on_disk
    assert Image.open(io.BytesIO(on_disk)).size == (24, 24)


def test_images_purge_deletes_the_bytes_and_the_task_answers_expired(dir_stack):
    task_id = submit_async(dir_stack.client, model="local", prompt="to purge", size="16x16")
    assert wait_for_end(dir_stack.client, task_id)["task_status"] == "succeed"
    (row,) = dir_stack.rows(task_id)
    path = dir_stack.directory / "images" / row.store_key
    assert path.exists()

    kept = run_cli(["images", "purge", "--older-than", "1d"], dir_stack.env)
    assert kept.returncode == 0, kept.stderr
    assert kept.stdout.strip() == "purged the images of 0 task(s): 0 image(s) deleted" and path.exists()

    purged = run_cli(["images", "purge", "--older-than", "0"], dir_stack.env)
    assert purged.returncode == 0, purged.stderr
    tasks, images = (int(word) for word in purged.stdout.split() if word.isdigit())
    assert tasks >= 1 and images >= 1  # this task's, and those of the tests before it
    assert not path.exists() and dir_stack.rows(task_id) == []
    body = dir_stack.client.get(f"/v1/images/{task_id}").json()
    assert (body["task_status"], body["data"], body["expired"]) == ("succeed", [], True)


@pytest.mark.parametrize("value", ["7x", "-1d", "soon", ""])
def test_images_purge_refuses_a_bad_duration_in_one_line(env, value):
    result = run_cli(["images", "purge", "--older-than", value], env)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1 and "--older-than" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
