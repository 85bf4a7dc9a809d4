"""Many concurrent async submits through a real `imagegate api` process, grouped into multi-row
INSERTs and pipelined publishes: every one answered 202, stored once and published exactly once."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
import redis

from imagegate.app.queue import QUEUE
from tests.support.processes import start_api, stop_process
from tests.support.services import free_port

PROMPT = "a crowd of foxes, all at once"
SUBMITS = 200


def test_concurrent_async_submits_are_each_stored_and_published_exactly_once(
    migrated, env, redis_dbs, run_dir, database_url, api_key
):
    queue = redis.Redis.from_url(redis_dbs[1])  # no worker consumes it
    queue.delete(QUEUE)
    port = free_port()
    log = run_dir / "api-grouped.log"
    # One process, its key cached by a first request: the submits then hold one Postgres connection
    # at a time (the group's), which the machine's shared Postgres can spare.
    process = start_api(env | {"IMAGEGATE_BROKER_URL": redis_dbs[1]}, log, port, workers=1)
    database = database_url.replace("postgresql+psycopg://", "postgresql://")
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {api_key}"},
            limits=httpx.Limits(max_connections=64),
            timeout=60,
        ) as http:
            assert http.get("/v1/models").status_code == 200

            def submit(index: int) -> httpx.Response:
                return http.post("/v1/images/generations", json={"prompt": PROMPT, "n": 1, "async": True})

            with ThreadPoolExecutor(64) as pool:
                replies = list(pool.map(submit, range(SUBMITS)))

        assert [reply.status_code for reply in replies] == [202] * SUBMITS
        task_ids = [reply.json()["task_id"] for reply in replies]
        assert len(set(task_ids)) == SUBMITS
        with psycopg.connect(database) as db:
            stored = db.execute("SELECT id::text, status FROM tasks WHERE id::text = ANY(%s)", (task_ids,)).fetchall()
        assert sorted(stored) == sorted((task_id, "pending") for task_id in task_ids)
        queued = [json.loads(base64.b64decode(json.loads(raw)["body"]))[0] for raw in queue.lrange(QUEUE, 0, -1)]
        assert sorted(queued) == sorted([task_id, 1] for task_id in task_ids)  # each once, attempt 1
        assert not [line for line in log.read_text().splitlines() if "Traceback" in line or '"error"' in line]
    finally:
        stop_process(process)
        queue.delete(QUEUE)
        with psycopg.connect(database, autocommit=True) as db:  # ended, so no sweeper test finds them pending
            db.execute(
                "UPDATE tasks SET status = 'failed', error_code = 'cancelled', finished_at = now() "
                "WHERE status = 'pending' AND request->>'prompt' = %s",
                (PROMPT,),
            )
