"""Per-model upstream limits kept by several real `imagegate worker` processes together, seen from the
fake upstream: never more calls of a model in flight than its `max_concurrency`, never more in any
minute than its `rpm`; a waiting task says why and uses no retry; a killed worker's slot comes back
once its lease ends; a 429 pauses the model for every worker.

One imagegate of this module's own (database, throwaway Redis, API, three workers, sweeper) on the
shared fake upstream, each model under an upstream name of its own. The rate workload is submitted
first and checked last: its waiting tasks need the minute to pass, and the other tests run meanwhile.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, create_engine, text

from imagegate.app.migrate import upgrade
from tests.support.databases import drop_database, fresh_database
from tests.support.fake_upstream import Step
from tests.support.flows import submit_async, wait_for_end
from tests.support.processes import create_key, start_api, start_process, start_worker, stop_process
from tests.support.services import free_port, start_redis, wait_until

pytestmark = pytest.mark.e2e

RPM = 6
RATE_TASKS = 8
LEASE_S = 3.0
UNIQUE = uuid.uuid4().hex[:8]
UPSTREAM = {name: f"{name}-{UNIQUE}" for name in ("conc", "rate", "lease", "hot")}


@dataclass
class Limited:
    directory: Path
    env: dict[str, str]
    api_url: str
    key: str
    processes: list[subprocess.Popen]
    engine: Engine
    rate_tasks: list[str] = field(default_factory=list)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.api_url, headers={"Authorization": f"Bearer {self.key}"}, timeout=30)

    def worker_of(self, task_id: str) -> str | None:
        with self.engine.connect() as connection:
            return connection.execute(text("SELECT worker FROM tasks WHERE id = :id"), {"id": task_id}).scalar()


@pytest.fixture(scope="module")
def limited(postgres_url, upstream, tmp_path_factory):
    directory = tmp_path_factory.mktemp("model-limits")
    database_url = fresh_database(postgres_url)
    upgrade(database_url)
    redis_server = start_redis()
    providers = directory / "providers.toml"
    common = f'adapter = "openai"\nbase_url = "{upstream.base_url}"\nallow_private_downloads = true\n'
    providers.write_text(f"""
[models."conc"]
{common}upstream_model = "{UPSTREAM["conc"]}"
max_images_per_call = 1
max_concurrency = 2

[models."rate"]
{common}upstream_model = "{UPSTREAM["rate"]}"
rpm = {RPM}

[models."lease"]
{common}upstream_model = "{UPSTREAM["lease"]}"
max_concurrency = 1
timeout_s = 60

[models."hot"]
{common}upstream_model = "{UPSTREAM["hot"]}"
rpm = 20
max_retries = 3
""")
    api_port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("IMAGEGATE_")} | {
        "IMAGEGATE_DATABASE_URL": database_url,
        "IMAGEGATE_BROKER_URL": f"{redis_server.url}/0",
        "IMAGEGATE_PROVIDERS_FILE": str(providers),
        "IMAGEGATE_SECRET_KEY": uuid.uuid4().hex * 2,
        "IMAGEGATE_PUBLIC_URL": f"http://127.0.0.1:{api_port}",
        "IMAGEGATE_LEASE_S": str(LEASE_S),
        "IMAGEGATE_SWEEP_INTERVAL_S": "0.5",
        "IMAGEGATE_REPUBLISH_AFTER_S": "5",
        "IMAGEGATE_RETRY_BASE_S": "0.2",
        "IMAGEGATE_RETRY_MAX_S": "10",
        "IMAGEGATE_MODEL_WAIT_S": "0.3",
        "IMAGEGATE_SHUTDOWN_GRACE_S": "2",
        "IMAGEGATE_WORKER_PROCESSES": "1",  # three workers are three processes (one is killed)
    }
    engine = create_engine(database_url)
    # Started together, and each told ready: starting one after the other took most of a minute.
    logs = [directory / f"worker-{index}.log" for index in range(3)]
    processes = [start_process(["worker", "--concurrency", "10"], env, log) for log in logs]
    try:
        processes.append(start_process(["sweeper"], env, directory / "sweeper.log"))
        processes.append(start_api(env, directory / "api.log", api_port))
        for worker, log in zip(processes, logs, strict=False):
            wait_until(lambda w=worker, f=log: w.poll() is not None or "ready" in f.read_text(), 60, "a worker")
            assert worker.poll() is None, log.read_text()
        cluster = Limited(directory, env, f"http://127.0.0.1:{api_port}", create_key(env, "limits"), processes, engine)
        with cluster.client() as client:  # the rate workload: more than a minute's worth at once
            prompt = f"rate {UNIQUE}"
            cluster.rate_tasks = [submit_async(client, model="rate", prompt=prompt) for _ in range(RATE_TASKS)]
        yield cluster
    finally:
        for process in processes:  # all asked to stop at once, each then waited for
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            stop_process(process)
        engine.dispose()
        redis_server.stop()
        drop_database(database_url)


def most_in_any_minute(times: list[float]) -> int:
    return max((sum(start <= at < start + 60 for at in times) for start in times), default=0)


def no_call_repeated(upstream, model: str) -> bool:
    """Every call of the model carries its own Idempotency-Key (task, attempt, fan-out slot)."""
    keys = [call.key for call in upstream.calls if call.body.get("model") == UPSTREAM[model]]
    return all(keys) and len(set(keys)) == len(keys)


def watch(client: httpx.Client, task_ids: list[str], timeout_s: float = 60) -> tuple[dict[str, dict], set[str]]:
    """Poll the tasks until all ended: their last view, and every queued_reason seen meanwhile."""
    seen: set[str] = set()
    last: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for task_id in task_ids:
            body = client.get(f"/v1/images/{task_id}").json()
            last[task_id] = body
            assert "queued_reason" in body
            if body["queued_reason"]:
                assert body["task_status"] == "pending"
                seen.add(body["queued_reason"])
        if all(body["task_status"] in ("succeed", "failed") for body in last.values()):
            return last, seen
        time.sleep(0.1)
    raise AssertionError(f"not all ended within {timeout_s} s: {last}")


def test_tasks_over_the_rate_wait_saying_why_without_using_an_attempt(limited, upstream):
    wait_until(lambda: len(upstream.call_times(UPSTREAM["rate"])) >= RPM, 30, f"the first {RPM} calls")
    time.sleep(2)  # the rest would have been called by now, were they let in
    assert len(upstream.call_times(UPSTREAM["rate"])) == RPM
    with limited.client() as client:
        bodies = [client.get(f"/v1/images/{task_id}").json() for task_id in limited.rate_tasks]
    waiting = [body for body in bodies if body["task_status"] == "pending"]
    assert len(waiting) == RATE_TASKS - RPM
    for body in waiting:
        assert body["queued_reason"] == "model_rate_limit" and body["attempts"] == 0
    for body in bodies:
        if body["task_status"] == "succeed":
            assert body["queued_reason"] is None


def test_several_workers_together_never_exceed_max_concurrency(limited, upstream):
    prompt = f"conc {UNIQUE}"
    upstream.script(prompt, *[Step(delay_s=0.6) for _ in range(20)])
    with limited.client() as client:
        # Fan-outs of two calls (one image per call) among single calls: 16 calls, 2 at a time.
        task_ids = [submit_async(client, model="conc", prompt=prompt, n=2 if i % 3 == 0 else 1) for i in range(12)]
        last, seen = watch(client, task_ids)
    assert all(body["task_status"] == "succeed" for body in last.values()), last
    assert upstream.peak_in_flight(UPSTREAM["conc"]) == 2
    assert len(upstream.call_times(UPSTREAM["conc"])) == 16  # one call per image
    assert no_call_repeated(upstream, "conc")
    assert "model_concurrency_limit" in seen
    assert all(body["attempts"] == 1 for body in last.values())  # waiting used no attempt, so no retry
    with limited.engine.connect() as connection:
        workers = connection.execute(
            text("SELECT count(DISTINCT worker) FROM attempts WHERE task_id::text = ANY(:ids)"), {"ids": task_ids}
        ).scalar()
    assert workers >= 2  # the limit held across processes, not within one


def test_a_killed_workers_slot_comes_back_once_its_lease_ends(limited, upstream):
    held_prompt, next_prompt = f"held {UNIQUE}", f"next {UNIQUE}"
    upstream.script(held_prompt, Step(delay_s=30))  # the first call outlives its worker; a retry succeeds
    with limited.client() as client:
        held = submit_async(client, model="lease", prompt=held_prompt)
        wait_until(lambda: upstream.calls_for(held_prompt), 20, "the held call")
        worker = limited.worker_of(held)
        (victim,) = [p for p in limited.processes if worker and worker.startswith(f"imagegate-{p.pid}@")]
        os.killpg(victim.pid, signal.SIGKILL)
        killed_at = time.time()
        waiting = submit_async(client, model="lease", prompt=next_prompt)
        last, seen = watch(client, [held, waiting], timeout_s=60)
    assert "model_concurrency_limit" in seen
    (call,) = upstream.calls_for(next_prompt)
    # The slot was still held after the kill (renewed up to a third of a lease before it), and came
    # back when its lease ended, not only when the killed attempt's task was taken back.
    assert LEASE_S * 2 / 3 - 0.3 <= call.at - killed_at <= LEASE_S + 5
    assert last[waiting]["task_status"] == "succeed" and last[waiting]["attempts"] == 1
    assert last[held]["task_status"] == "succeed" and last[held]["attempts"] == 2  # taken back by the sweeper
    limited.processes.append(start_worker(limited.env, limited.directory / "worker-replacing.log"))


def test_a_429_pauses_the_model_for_every_worker_for_its_retry_after(limited, upstream):
    first, others = f"hot {UNIQUE}", [f"hot {UNIQUE} {index}" for index in range(4)]
    upstream.script(first, Step(status=429, error_code="rate_limit_exceeded", headers={"Retry-After": "3"}))
    with limited.client() as client:
        throttled = submit_async(client, model="hot", prompt=first, retries=2)

        def retrying() -> bool:  # its first attempt ended (telling the gate of the 429): pending again
            body = client.get(f"/v1/images/{throttled}").json()
            assert body["task_status"] != "failed", body
            return body["attempts"] == 1 and body["task_status"] == "pending"

        wait_until(retrying, 20, "the 429")
        refused_at = upstream.calls_for(first)[0].at
        task_ids = [submit_async(client, model="hot", prompt=prompt) for prompt in others]
        last, seen = watch(client, [throttled, *task_ids], timeout_s=30)
    assert all(body["task_status"] == "succeed" for body in last.values()), last
    assert "model_rate_limit" in seen
    later = [at for at in upstream.call_times(UPSTREAM["hot"]) if at > refused_at]
    assert len(later) == 5 and min(later) >= refused_at + 2.9  # nobody called during Retry-After
    assert last[throttled]["attempts"] == 2  # the 429 itself was a real call: its retry is one attempt more
    assert all(last[task_id]["attempts"] == 1 for task_id in task_ids)


def test_no_minute_holds_more_than_rpm_calls_and_the_waiting_tasks_run_after_it(limited, upstream):
    with limited.client() as client:
        last = {task_id: wait_for_end(client, task_id, timeout_s=90) for task_id in limited.rate_tasks}
    assert all(body["task_status"] == "succeed" and body["attempts"] == 1 for body in last.values()), last
    times = upstream.call_times(UPSTREAM["rate"])
    assert len(times) == RATE_TASKS
    assert most_in_any_minute(times) == RPM
    assert times[RPM] >= times[0] + 60
    assert no_call_repeated(upstream, "rate")
