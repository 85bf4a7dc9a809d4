"""Async submits in groups (app/web/async_submits.py), on the real Postgres and Redis: submits that
arrive while a group runs are one INSERT and one publish, each stored and queued exactly once; a row
Postgres refuses fails its own submit alone; a database error fails the whole group with 503 and
stores none of it."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
import redis
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from imagegate.app.keys import authenticate, create_key
from imagegate.app.models import Task, utcnow
from imagegate.app.queue import QUEUE, RunPublisher, reuse_publish_client
from imagegate.app.runtime import build_runtime
from imagegate.app.web import create_app
from imagegate.app.web.async_submits import AsyncSubmits


def _wait_for(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _queued(queue: redis.Redis) -> list[tuple[str, int]]:
    """(task id, attempt) of each message in the queue."""
    return [tuple(json.loads(base64.b64decode(json.loads(raw)["body"]))[0][:2]) for raw in queue.lrange(QUEUE, 0, -1)]


PROMPT = "a fox, submitted in a group"


@pytest.fixture
def runtime(settings, redis_dbs, migrated):
    runtime = build_runtime(settings.model_copy(update={"broker_url": redis_dbs[1]}), pool_size=4, max_overflow=0)
    reuse_publish_client(runtime.celery)  # as the API does
    yield runtime
    with runtime.engine.begin() as connection:  # ended, so that no sweeper test finds them pending
        connection.execute(
            update(Task)
            .where(Task.status == "pending", Task.request["prompt"].as_string() == PROMPT)
            .values(status="failed", error_code="cancelled", finished_at=utcnow())
        )
    runtime.engine.dispose()


class Recording:
    """The real TaskStore and RunPublisher, noting each group's size; the first INSERT holds until
    `hold` submits wait behind it, so that they form one group."""

    def __init__(self, runtime, hold: int):
        self.tasks, self.runs = runtime.tasks, RunPublisher(runtime.celery)
        self.inserts: list[int] = []
        self.publishes: list[int] = []
        self.hold = hold
        self.submits = AsyncSubmits(self, self)  # type: ignore[arg-type]

    def accept_many(self, rows):
        self.inserts.append(len(rows))
        if len(self.inserts) == 1:
            _wait_for(lambda: self.submits.waiting >= self.hold)
        return self.tasks.accept_many(rows)

    def publish_many(self, task_ids):
        self.publishes.append(len(task_ids))
        return self.runs.publish_many(task_ids)


def _submit_together(recording: Recording, key_ids: list[uuid.UUID]) -> list:
    """One submit per key id: the first alone, the rest while it is held. Each one's task id, or the
    error it raised."""

    def submit(key_id):
        try:
            return recording.submits.submit(
                api_key_id=key_id, model="local", request={"prompt": PROMPT}, response_format="url", callback_url=None
            ).id
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            return exc

    with ThreadPoolExecutor(len(key_ids)) as pool:
        first = pool.submit(submit, key_ids[0])
        _wait_for(lambda: recording.inserts)
        rest = [pool.submit(submit, key_id) for key_id in key_ids[1:]]
        return [first.result(30)] + [future.result(30) for future in rest]


def _stored(runtime, task_ids) -> dict[uuid.UUID, str]:
    with runtime.engine.connect() as connection:
        return dict(connection.execute(select(Task.id, Task.status).where(Task.id.in_(task_ids))).all())


def test_submits_arriving_together_are_one_insert_and_one_publish_and_each_stored_and_queued_once(
    runtime, api_key, idle_queue
):
    key_id = authenticate(runtime.sessions, api_key).id
    recording = Recording(runtime, hold=11)

    task_ids = _submit_together(recording, [key_id] * 12)

    assert all(isinstance(task_id, uuid.UUID) for task_id in task_ids) and len(set(task_ids)) == 12
    assert recording.inserts == [1, 11] and recording.publishes == [1, 11]
    assert _stored(runtime, task_ids) == {task_id: "pending" for task_id in task_ids}
    assert sorted(_queued(idle_queue)) == sorted((str(task_id), 1) for task_id in task_ids)


def test_a_row_postgres_refuses_fails_its_own_submit_and_the_rest_of_its_group_is_stored_and_queued(
    runtime, api_key, idle_queue
):
    key_id, unknown_key = authenticate(runtime.sessions, api_key).id, uuid.uuid4()  # no such key: a foreign key error
    recording = Recording(runtime, hold=5)

    outcomes = _submit_together(recording, [key_id, key_id, key_id, unknown_key, key_id, key_id])

    assert isinstance(outcomes[3], IntegrityError)
    accepted = outcomes[:3] + outcomes[4:]
    assert recording.inserts[:2] == [1, 5]
    assert _stored(runtime, accepted) == {task_id: "pending" for task_id in accepted}
    with runtime.engine.connect() as connection:
        assert connection.execute(select(Task.id).where(Task.api_key_id == unknown_key)).all() == []
    assert sorted(_queued(idle_queue)) == sorted((str(task_id), 1) for task_id in accepted)


def test_a_database_error_in_a_group_answers_503_to_each_of_its_requests_and_stores_none(
    settings, redis_dbs, own_database, idle_queue
):
    """Postgres cancels the group's INSERT (statement_timeout while the table is locked): every
    request of the group gets 503 and none of its rows exists, not even in part."""
    plain = own_database.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{plain.rsplit("/", 1)[1]}" SET statement_timeout = 1500')
    app = create_app(settings.model_copy(update={"database_url": own_database, "broker_url": redis_dbs[1]}))
    key = create_key(app.extensions["imagegate"].sessions, "grouped").key
    headers = {"Authorization": f"Bearer {key}"}
    body = {"prompt": "a fox", "async": True}
    assert app.test_client().get("/v1/models", headers=headers).status_code == 200  # the key is cached now

    with psycopg.connect(plain) as locker:
        locker.execute("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
        started = threading.Barrier(8)

        def post():
            started.wait(10)
            return app.test_client().post("/v1/images/generations", json=body, headers=headers)

        with ThreadPoolExecutor(8) as pool:
            replies = [future.result(30) for future in [pool.submit(post) for _ in range(8)]]
        locker.rollback()

    assert [reply.status_code for reply in replies] == [503] * 8
    assert {reply.get_json()["error"]["code"] for reply in replies} == {"database_unavailable"}
    with psycopg.connect(plain) as reader:
        assert reader.execute("SELECT count(*) FROM tasks").fetchone()[0] == 0
    assert _queued(idle_queue) == []

    reply = app.test_client().post("/v1/images/generations", json=body, headers=headers)  # the lock is gone
    assert reply.status_code == 202
    assert _queued(idle_queue) == [(reply.get_json()["task_id"], 1)]
    app.extensions["imagegate"].engine.dispose()
