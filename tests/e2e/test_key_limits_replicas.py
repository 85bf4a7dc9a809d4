"""Per-key limits hold across API replicas: two `imagegate api` processes sharing one Redis and one
Postgres, a key's limits set with `imagegate keys create`, and concurrent submits spread over both.
They publish where no worker consumes, so accepted tasks stay pending (and are ended afterwards)."""

from __future__ import annotations

import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
import pytest

from tests.support.processes import run_cli, start_api, stop_process
from tests.support.services import free_port

PROMPT = "a replicated limit"


@pytest.fixture(scope="module")
def replicas(migrated, env, redis_dbs, run_dir, database_url):
    quiet = env | {"IMAGEGATE_BROKER_URL": redis_dbs[1]}
    ports = [free_port(), free_port()]
    processes = [start_api(quiet, run_dir / f"api-replica-{index}.log", port) for index, port in enumerate(ports)]
    try:
        yield [f"http://127.0.0.1:{port}" for port in ports]
    finally:
        for process in processes:
            stop_process(process)
        with psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as db:
            db.execute(
                "UPDATE tasks SET status = 'failed', error_code = 'cancelled', finished_at = now() "
                "WHERE status = 'pending' AND request->>'prompt' = %s",
                (PROMPT,),
            )


def limited_key(env, *limits: str) -> str:
    result = run_cli(["keys", "create", "--name", f"replicated-{uuid.uuid4().hex[:8]}", *limits], env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def submit_everywhere(replicas: list[str], key: str, count: int, n: int = 1) -> list[httpx.Response]:
    """`count` async submits at once, alternating between the replicas."""

    def one(index: int) -> httpx.Response:
        return httpx.post(
            f"{replicas[index % len(replicas)]}/v1/images/generations",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "local", "prompt": PROMPT, "n": n, "async": True},
            timeout=30,
        )

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(one, range(count)))


def codes(replies: list[httpx.Response]) -> Counter:
    """202s counted as 202, 429s by their error code."""
    return Counter(
        reply.json()["error"]["code"] if reply.status_code == 429 else reply.status_code for reply in replies
    )


def test_requests_per_minute_hold_across_replicas(replicas, env):
    key = limited_key(env, "--rpm", "10")
    replies = submit_everywhere(replicas, key, 30)
    assert codes(replies) == {202: 10, "rate_limit_exceeded": 20}
    accepted = [reply for reply in replies if reply.status_code == 202]
    # Each accepted submit took its own place in the one shared window.
    assert sorted(int(reply.headers["x-ratelimit-remaining-requests"]) for reply in accepted) == list(range(10))
    # Both replicas answered half the submits; a count per process would have accepted up to 20.
    # Which replica won the ten places is a race, so it is not asserted.
    assert Counter(reply.url.port for reply in replies) == {httpx.URL(url).port: 15 for url in replicas}
    assert all(int(reply.headers["Retry-After"]) >= 1 for reply in replies if reply.status_code == 429)


def test_images_per_day_hold_across_replicas(replicas, env):
    key = limited_key(env, "--images-per-day", "12")
    replies = submit_everywhere(replicas, key, 10, n=3)
    assert codes(replies) == {202: 4, "images_per_day_exceeded": 6}
    assert min(int(reply.headers["x-ratelimit-remaining-images"]) for reply in replies) == 0


def test_pending_tasks_hold_across_replicas(replicas, env, database_url):
    key = limited_key(env, "--max-pending", "5")
    replies = submit_everywhere(replicas, key, 20)
    assert codes(replies) == {202: 5, "too_many_pending_tasks": 15}
    accepted = [reply.json()["task_id"] for reply in replies if reply.status_code == 202]
    with psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://")) as db:
        pending = db.execute(
            "SELECT count(*) FROM tasks WHERE status = 'pending' AND id = ANY(%s::uuid[])", (accepted,)
        ).fetchone()[0]
    assert pending == 5
