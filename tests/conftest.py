"""Test fixtures: a database and Redis db indexes of this run's own, a fake upstream, and a real
Celery worker and API server started through the `imagegate` CLI."""

from __future__ import annotations

import os
import secrets
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from imagegate.app.queue import QUEUE
from imagegate.app.settings import Settings
from tests.support.databases import drop_database, fresh_database
from tests.support.fake_chat import FakeChat
from tests.support.fake_upstream import FakeUpstream
from tests.support.processes import (
    create_key,
    run_cli,
    start_api,
    start_worker,
    stop_process,
)
from tests.support.services import (
    MissingService,
    free_port,
    machine_rabbitmq,
    reachable,
    start_postgres,
    start_rabbitmq,
    start_redis,
)

LOCK_KEY = "imagegate-test:lock"


def _service(port: int, local_url: str, start_throwaway):
    """The machine's service when reachable, else a throwaway one, else stop with what is missing."""
    if reachable("127.0.0.1", port):
        yield local_url
        return
    try:
        server = start_throwaway()
    except MissingService as exc:
        pytest.exit(str(exc), returncode=3)
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def postgres_url():
    yield from _service(5432, "postgresql+psycopg://postgres@127.0.0.1:5432", start_postgres)


@pytest.fixture(scope="session")
def redis_server_url():
    yield from _service(6379, "redis://127.0.0.1:6379", start_redis)


@pytest.fixture(scope="session")
def database_url(postgres_url):
    """A database of this run's own, created empty, dropped at the end."""
    name = f"imagegate_test_{uuid.uuid4().hex[:12]}"
    admin = postgres_url.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    yield f"{postgres_url}/{name}"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _claim_redis_db(server_url: str, taken: set[int]) -> int:
    for index in range(1, 16):
        if index in taken:
            continue
        client = redis.Redis.from_url(f"{server_url}/{index}")
        if client.set(LOCK_KEY, "1", nx=True, ex=6 * 3600):
            client.flushdb()
            client.set(LOCK_KEY, "1", ex=6 * 3600)
            return index
    raise RuntimeError("no free Redis db index (1-15) for this test run")


@pytest.fixture(scope="session")
def redis_dbs(redis_server_url):
    """Two Redis db indexes of this run's own: one the worker consumes, one nobody consumes."""
    busy = _claim_redis_db(redis_server_url, set())
    idle = _claim_redis_db(redis_server_url, {busy})
    yield f"{redis_server_url}/{busy}", f"{redis_server_url}/{idle}"
    for url in (f"{redis_server_url}/{busy}", f"{redis_server_url}/{idle}"):
        redis.Redis.from_url(url).flushdb()


@pytest.fixture
def idle_queue(redis_dbs):
    """The run queue of the Redis db nobody consumes, emptied before and after the test."""
    queue = redis.Redis.from_url(redis_dbs[1])
    queue.delete(QUEUE)
    yield queue
    queue.delete(QUEUE)


@pytest.fixture(scope="session")
def upstream():
    server = FakeUpstream().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def chat_upstream():
    server = FakeChat().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("imagegate")


@pytest.fixture(scope="session")
def providers_file(run_dir, upstream, chat_upstream) -> Path:
    path = run_dir / "providers.toml"
    path.write_text(f"""
[models."local"]
adapter = "local"
max_retries = 2

[models."fake-dalle"]
adapter = "openai"
base_url = "{upstream.base_url}"
api_key_env = "FAKE_UPSTREAM_KEY"
upstream_model = "dall-e-3"
timeout_s = 5
max_retries = 3
allow_private_downloads = true

[models."fake-grok"]
adapter = "openai"
base_url = "{upstream.base_url}"
upstream_model = "grok-3-image"
family = "grok"
wrap_params = ["aspect_ratio", "quality", "resolution"]
allow_private_downloads = true

[models."fake-async"]
adapter = "geekai_async"
base_url = "{upstream.base_url}"
poll_interval_s = 0.2
poll_deadline_s = 60
allow_private_downloads = true

[models."fake-one"]
adapter = "openai"
base_url = "{upstream.base_url}"
max_images_per_call = 1
timeout_s = 7
allow_private_downloads = true

[models."fake-primary"]
adapter = "openai"
base_url = "{upstream.base_url}"
upstream_model = "primary-model"
max_retries = 0
fallbacks = ["fake-backup"]
allow_private_downloads = true

[models."fake-backup"]
adapter = "openai"
base_url = "{upstream.base_url}"
upstream_model = "backup-model"
allow_private_downloads = true

[models."fake-chat"]
adapter = "chat_image"
base_url = "{chat_upstream.base_url}"
upstream_model = "gemini-2.5-flash-image"
system_prompt = "你是一个AI画图机器人,请根据用户需求进行画图"
image_generation = true
allow_private_downloads = true

[models."fake-strict"]
adapter = "openai"
base_url = "{upstream.base_url}"
""")
    return path


@pytest.fixture(scope="session")
def api_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def env(database_url, redis_dbs, providers_file, api_port) -> dict[str, str]:
    """The environment every imagegate process of this run gets."""
    base = {name: value for name, value in os.environ.items() if not name.startswith("IMAGEGATE_")}
    return base | {
        "IMAGEGATE_DATABASE_URL": database_url,
        "IMAGEGATE_BROKER_URL": redis_dbs[0],
        "IMAGEGATE_PROVIDERS_FILE": str(providers_file),
        "IMAGEGATE_SECRET_KEY": secrets.token_urlsafe(32),
        "IMAGEGATE_PUBLIC_URL": f"http://127.0.0.1:{api_port}",
        "IMAGEGATE_SYNC_TIMEOUT_S": "30",
        "IMAGEGATE_MAX_BODY_BYTES": "200000",
        "IMAGEGATE_RETRY_BASE_S": "0.2",
        "IMAGEGATE_RETRY_MAX_S": "10",
        # Webhook receivers in the tests listen on 127.0.0.1; retries come quickly.
        "IMAGEGATE_WEBHOOK_ALLOW_PRIVATE": "1",
        "IMAGEGATE_WEBHOOK_RETRY_SCHEDULE": "1,1,1",
        # One process per `imagegate worker` (not one per core): the tests count and signal processes,
        # and share the machine's 100 Postgres connections. tests/e2e/test_worker_lifecycle.py runs groups.
        "IMAGEGATE_WORKER_PROCESSES": "1",
        "FAKE_UPSTREAM_KEY": "sk-upstream-secret-" + secrets.token_hex(8),
    }


@pytest.fixture(scope="session")
def settings(env) -> Settings:
    return Settings(
        **{name[len("IMAGEGATE_") :].lower(): value for name, value in env.items() if name.startswith("IMAGEGATE_")}
    )


@pytest.fixture(scope="session")
def migrated(env):
    result = run_cli(["db", "upgrade"], env)
    assert result.returncode == 0, result.stderr
    return True


@pytest.fixture(scope="session")
def worker(migrated, env, run_dir):
    log = run_dir / "worker.log"
    process = start_worker(env, log, concurrency=100)
    yield process
    stop_process(process)


@pytest.fixture(scope="session")
def api_url(migrated, env, api_port, run_dir):
    log = run_dir / "api.log"
    process = start_api(env, log, api_port)
    yield f"http://127.0.0.1:{api_port}"
    stop_process(process)


@pytest.fixture(scope="session")
def api_key(migrated, env) -> str:
    return create_key(env, "tests")


@pytest.fixture(scope="session")
def other_key(migrated, env) -> str:
    return create_key(env, "someone-else")


@pytest.fixture
def client(api_url, api_key, worker):
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=60) as http:
        yield http


@pytest.fixture
def prompt() -> str:
    """A prompt no other test uses, so the fake upstream's script and log are this test's own."""
    return f"a red fox {uuid.uuid4().hex}"


@pytest.fixture(scope="session")
def app_client(settings, redis_dbs, migrated):
    """The Flask app in this process, publishing to the Redis db index no worker consumes."""
    from imagegate.app.web import create_app

    return create_app(settings.model_copy(update={"broker_url": redis_dbs[1]})).test_client()


@pytest.fixture(scope="session")
def count_tasks(database_url):
    """How many task rows exist: a refused request must not add one."""
    from sqlalchemy import create_engine, func, select

    from imagegate.app.models import Task

    engine = create_engine(database_url)

    def count() -> int:
        with engine.connect() as connection:  # closed each time, so dropping the database is not blocked
            return connection.execute(select(func.count()).select_from(Task)).scalar_one()

    yield count
    engine.dispose()


@pytest.fixture
def own_redis():
    """A redis-server of this test's own, for tests that stop it, flush it or count all of it."""
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture
def own_database(postgres_url):
    """A migrated database of this test's own, beside the session's."""
    from imagegate.app.migrate import upgrade

    url = fresh_database(postgres_url)
    upgrade(url)
    yield url
    drop_database(url)


@pytest.fixture(scope="session")
def rabbitmq():
    """The machine's RabbitMQ when it answers (and rabbitmqctl reaches it), else a throwaway node,
    else stop with what is missing."""
    node = machine_rabbitmq()
    if node is not None:
        yield node
        return
    try:
        node = start_rabbitmq()
    except MissingService as exc:
        pytest.exit(str(exc), returncode=3)
    yield node
    node.stop()


@pytest.fixture(scope="session")
def amqp_url(rabbitmq):
    """A RabbitMQ vhost of this run's own (amqp://guest:guest@127.0.0.1:5672/imagegate-test-...)."""
    url = rabbitmq.add_vhost()
    yield url
    rabbitmq.delete_vhost(url)


@pytest.fixture
def own_vhost(rabbitmq):
    """A RabbitMQ vhost of this test's own, for tests that count or purge all of it."""
    url = rabbitmq.add_vhost()
    yield url
    rabbitmq.delete_vhost(url)


@pytest.fixture
def own_rabbitmq():
    """A throwaway RabbitMQ node of this test's own, for tests that stop it (never the machine's)."""
    node = start_rabbitmq()
    yield node
    node.stop()
