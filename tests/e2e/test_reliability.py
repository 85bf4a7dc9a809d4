"""Never lose a job: cancellation, the sweeper, and intake while Postgres or Redis is down.
Real Postgres and Redis; the fault-injection suite with figures is tests/faults/."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import create_engine, text

from imagegate.app.models import utcnow
from imagegate.app.queue import QUEUE, celery_config
from imagegate.app.sweeper import make_sweeper
from imagegate.app.web import create_app
from tests.support.fake_upstream import Step
from tests.support.flows import submit_async, wait_for_end

# -- cancel -------------------------------------------------------------------------------------


def test_cancel_a_pending_task_ends_it_at_once(app_client, api_key, other_key):
    auth = {"Authorization": f"Bearer {api_key}"}
    task_id = app_client.post("/v1/images/generations", json={"prompt": "x", "async": True}, headers=auth).get_json()[
        "task_id"
    ]
    other = app_client.post(f"/v1/images/{task_id}/cancel", headers={"Authorization": f"Bearer {other_key}"})
    assert other.status_code == 404
    response = app_client.post(f"/v1/images/{task_id}/cancel", headers=auth)
    assert response.status_code == 200
    body = response.get_json()
    assert body["task_status"] == "failed" and body["error"]["code"] == "cancelled"
    again = app_client.post(f"/v1/images/{task_id}/cancel", headers=auth)
    assert again.status_code == 409 and again.get_json()["error"]["code"] == "task_finished"
    assert app_client.post("/v1/images/nope/cancel", headers=auth).status_code == 404


def _wait_running(client, task_id: str) -> None:
    deadline = time.monotonic() + 20
    while client.get(f"/v1/images/{task_id}").json()["task_status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.e2e
def test_a_cancelled_running_task_makes_no_further_upstream_call(client, upstream, prompt):
    upstream.script(prompt, Step(status=500, delay_s=1.5))
    task_id = submit_async(client, model="fake-dalle", prompt=prompt, retries=3)
    _wait_running(client, task_id)
    response = client.post(f"/v1/images/{task_id}/cancel")
    assert response.status_code == 202 and response.json()["cancel_requested"] is True
    body = wait_for_end(client, task_id)
    assert body["task_status"] == "failed" and body["error"]["code"] == "cancelled"
    time.sleep(1.0)
    assert len(upstream.calls_for(prompt)) == 1


@pytest.mark.e2e
def test_a_cancelled_running_task_stores_nothing(client, upstream, prompt, database_url):
    upstream.script(prompt, Step(delay_s=1.5))
    task_id = submit_async(client, model="fake-dalle", prompt=prompt)
    _wait_running(client, task_id)
    client.post(f"/v1/images/{task_id}/cancel")
    body = wait_for_end(client, task_id)
    assert body["task_status"] == "failed" and body["error"]["code"] == "cancelled"
    with create_engine(database_url).connect() as connection:
        stored = connection.execute(text("SELECT count(*) FROM images WHERE task_id = :id"), {"id": task_id})
        assert stored.scalar_one() == 0


# -- the sweeper --------------------------------------------------------------------------------


@pytest.fixture
def sweeper_settings(settings, redis_dbs):
    return settings.model_copy(
        update={"broker_url": redis_dbs[1], "republish_after_s": 5.0, "max_attempts": 3, "task_deadline_s": 3600.0}
    )


@pytest.fixture
def make_tasks(database_url, api_key, migrated):
    engine = create_engine(database_url)
    with engine.connect() as connection:
        key_id = connection.execute(text("SELECT id FROM api_keys ORDER BY created_at LIMIT 1")).scalar_one()
    created: list[str] = []

    def insert(count: int, **columns) -> list[str]:
        ids = [str(uuid.uuid4()) for _ in range(count)]
        created.extend(ids)
        values = {
            "status": "pending",
            "attempts": 0,
            "run_after": utcnow(),
            "lease_expires_at": None,
            "created_at": utcnow(),
            "cancel_requested": False,
        } | columns
        with engine.begin() as connection:
            for task_id in ids:
                connection.execute(
                    text(
                        "INSERT INTO tasks (id, api_key_id, model, status, request, response_format, attempts, route,"
                        " retries_used, run_after, lease_expires_at, cancel_requested, polls, created_at) VALUES"
                        " (:id, :key, 'local', :status, '{\"prompt\": \"x\"}', 'url', :attempts, 'local', 0,"
                        " :run_after, :lease_expires_at, :cancel_requested, 0, :created_at)"
                    ),
                    {"id": task_id, "key": key_id} | values,
                )
        return ids

    def status(task_id: str):
        with engine.connect() as connection:
            return connection.execute(
                text("SELECT status, attempts, error_code FROM tasks WHERE id = :id"), {"id": task_id}
            ).one()

    insert.status = status
    yield insert
    # A later test's sweep must not find this one's tasks overdue (the tests are seconds apart).
    with engine.begin() as connection:
        connection.execute(
            text("UPDATE tasks SET status = 'failed' WHERE id::text = ANY(:ids) AND status IN ('pending', 'running')"),
            {"ids": created},
        )
    engine.dispose()


def queued_messages(queue, among: list[str] | None = None) -> list[tuple[str, int]]:
    """(task id, attempt) of each queued message; only of the tasks `among`, if given (pending tasks
    of other tests, whose messages the idle queue lost, are republished too, and rightly)."""
    import json

    messages = [json.loads(raw) for raw in queue.lrange(QUEUE, 0, -1)]
    found = [tuple(json.loads(__import__("base64").b64decode(m["body"]))[0][:2]) for m in messages]
    return [item for item in found if among is None or item[0] in among]


def test_two_sweepers_republish_each_lost_pending_task_exactly_once(sweeper_settings, make_tasks, idle_queue):
    lost = make_tasks(50, run_after=utcnow() - timedelta(seconds=60))
    fresh = make_tasks(5)  # just accepted: its message is presumably on its way
    sweepers = [make_sweeper(sweeper_settings) for _ in range(2)]
    threads = [threading.Thread(target=sweeper.sweep_once) for sweeper in sweepers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    messages = queued_messages(idle_queue, lost + fresh)
    assert sorted(task_id for task_id, _ in messages) == sorted(lost)
    assert {attempt for _, attempt in messages} == {1}
    assert not set(fresh) & {task_id for task_id, _ in messages}


def test_expired_leases_are_taken_back_and_the_attempt_ceiling_ends_a_task(sweeper_settings, make_tasks, idle_queue):
    expired = utcnow() - timedelta(seconds=1)
    lost = make_tasks(3, status="running", attempts=1, lease_expires_at=expired)
    alive = make_tasks(1, status="running", attempts=1, lease_expires_at=utcnow() + timedelta(minutes=1))
    poison = make_tasks(1, status="running", attempts=3, lease_expires_at=expired)
    cancelled = make_tasks(1, status="running", attempts=1, lease_expires_at=expired, cancel_requested=True)
    report = make_sweeper(sweeper_settings).sweep_once()
    assert (report.requeued, report.exhausted_failed) == (3, 2)
    assert sorted(queued_messages(idle_queue, lost + alive + poison + cancelled)) == sorted(
        (task_id, 2) for task_id in lost
    )
    assert [tuple(make_tasks.status(t)) for t in lost] == [("pending", 1, "worker_lost")] * 3
    assert tuple(make_tasks.status(alive[0]))[:2] == ("running", 1)
    assert tuple(make_tasks.status(poison[0])) == ("failed", 3, "attempts_exhausted")
    assert tuple(make_tasks.status(cancelled[0])) == ("failed", 1, "cancelled")


def test_tasks_past_the_deadline_fail(sweeper_settings, make_tasks, idle_queue):
    old = utcnow() - timedelta(hours=2)
    overdue = make_tasks(2, created_at=old) + make_tasks(
        1, status="running", attempts=1, created_at=old, lease_expires_at=utcnow() + timedelta(minutes=1)
    )
    make_sweeper(sweeper_settings).sweep_once()
    assert {tuple(make_tasks.status(t))[::2] for t in overdue} == {("failed", "deadline_exceeded")}
    assert queued_messages(idle_queue, overdue) == []


# -- intake while a part is down ----------------------------------------------------------------


def test_postgres_down_answers_503_and_publishes_nothing(settings, redis_dbs, api_key, idle_queue):
    from tests.support.services import free_port

    down = settings.model_copy(
        update={"broker_url": redis_dbs[1], "database_url": f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x"}
    )
    client = create_app(down).test_client()
    response = client.post(
        "/v1/images/generations", json={"prompt": "x", "async": True}, headers={"Authorization": f"Bearer {api_key}"}
    )
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "database_unavailable"
    assert idle_queue.llen(QUEUE) == 0


def test_redis_down_still_accepts_and_the_sweeper_publishes_once_it_is_back(
    settings, sweeper_settings, api_key, make_tasks, idle_queue
):
    from tests.support.services import free_port

    down = settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"})
    client = create_app(down).test_client()
    started = time.monotonic()
    response = client.post(
        "/v1/images/generations", json={"prompt": "x", "async": True}, headers={"Authorization": f"Bearer {api_key}"}
    )
    assert response.status_code == 202 and time.monotonic() - started < 10
    task_id = response.get_json()["task_id"]
    assert tuple(make_tasks.status(task_id))[:2] == ("pending", 0)
    later = sweeper_settings.model_copy(update={"republish_after_s": 0.0})
    time.sleep(0.1)
    make_sweeper(later).sweep_once()
    assert (task_id, 1) in queued_messages(idle_queue)


def test_every_time_limit_and_countdown_stays_below_the_visibility_timeout(settings):
    from imagegate.workers.runner import MAX_POLL_INTERVAL_S

    config = celery_config(settings)
    visibility = config["broker_transport_options"]["visibility_timeout"]
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1
    assert config["task_soft_time_limit"] < config["task_time_limit"] < visibility
    assert settings.retry_max_s < visibility
    assert MAX_POLL_INTERVAL_S + settings.lease_s < visibility
    assert settings.lease_s < visibility and settings.shutdown_grace_s < visibility
