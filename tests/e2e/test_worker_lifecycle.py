"""The worker process as its supervisor sees it: a clean stop exits 0 with no traceback, and a
worker whose broker went away and came back consumes again (or exits for a restart)."""

from __future__ import annotations

import os
import signal
import time
import uuid

import httpx
import psycopg
import pytest
import redis

from imagegate.app.queue import QUEUE
from tests.support.flows import submit_async, wait_for_end
from tests.support.processes import create_key, start_api, start_worker, stop_process
from tests.support.services import free_port, wait_until


def _stops_cleanly(process, log, stop) -> None:
    """`stop(process)`; the worker exits 0 and logs no traceback."""
    try:
        stop(process)
        assert process.wait(timeout=60) == 0, log.read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    output = log.read_text()
    assert "Traceback" not in output and "BlockingSwitchOutError" not in output, output


@pytest.mark.parametrize("pool", ["gevent", "threads"])
def test_sigterm_stops_an_idle_worker_cleanly(tmp_path, env, own_redis, migrated, pool):
    log = tmp_path / "worker.log"
    # A Redis of its own: no other test's messages reach this worker.
    process = start_worker(env | {"IMAGEGATE_BROKER_URL": f"{own_redis.url}/0"}, log, "--pool", pool)
    _stops_cleanly(process, log, lambda process: os.killpg(process.pid, signal.SIGTERM))


def test_a_worker_told_to_stop_by_several_signals_at_once_stops_cleanly(tmp_path, env, own_redis, migrated):
    """systemd signals every process of the unit, and Ctrl-C the terminal's whole process group,
    while a group's parent forwards the stop to its children too: a worker process gets the next
    signal while it is still handling the first."""
    log = tmp_path / "worker.log"
    process = start_worker(env | {"IMAGEGATE_BROKER_URL": f"{own_redis.url}/0"}, log, "--processes", "1")

    def signals_for_half_a_second(process) -> None:
        until = time.monotonic() + 0.5
        while time.monotonic() < until and process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)

    _stops_cleanly(process, log, signals_for_half_a_second)


def _publish_probe(settings) -> str:
    """A run message for a task that does not exist: a worker takes it, claims nothing, acknowledges."""
    from imagegate.app.queue import make_celery, publish_run

    publish_run(make_celery(settings), uuid.uuid4(), 1)
    return QUEUE


def test_a_worker_whose_consumer_stops_while_messages_wait_exits_for_a_restart(
    tmp_path, env, settings, own_redis, migrated
):
    # Celery's remote control stops the consumer of a live worker: the state a Redis restart left
    # one worker in (alive, polling nothing), made deterministic.
    broker_url = f"{own_redis.url}/0"
    log = tmp_path / "worker.log"
    process = start_worker(
        env | {"IMAGEGATE_BROKER_URL": broker_url, "IMAGEGATE_CONSUMER_STALL_S": "3"}, log, "--hostname", "stalled@test"
    )
    try:
        from imagegate.app.queue import WORKER_QUEUES, make_celery

        control = make_celery(settings.model_copy(update={"broker_url": broker_url})).control
        # On a loaded machine a reply can come after the timeout, and a broadcast sent before the
        # worker listens is dropped: ask until it answers (cancelling twice is harmless).
        for queue in WORKER_QUEUES:
            wait_until(
                lambda queue=queue: control.cancel_consumer(queue, destination=["stalled@test"], reply=True, timeout=2),
                60,
                f"the worker to answer cancel_consumer({queue})",
            )
        wait_until(lambda: "Canceling queue imagegate.webhooks" in log.read_text(), 30, "the cancel")
        time.sleep(1)  # a BRPOP already under way may still take one message: send two
        for _ in range(2):
            _publish_probe(settings.model_copy(update={"broker_url": broker_url}))
        assert process.wait(timeout=60) == 3, log.read_text()
        assert "the broker consumer is dead" in log.read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_after_redis_restarts_the_worker_consumes_again_or_exits(tmp_path, env, settings, own_redis, migrated):
    broker_url = f"{own_redis.url}/0"
    log = tmp_path / "worker.log"
    process = start_worker(env | {"IMAGEGATE_BROKER_URL": broker_url, "IMAGEGATE_CONSUMER_STALL_S": "10"}, log)
    try:
        own_redis.pause()
        time.sleep(2)
        own_redis.resume()
        broker = redis.Redis.from_url(broker_url)
        queue = _publish_probe(settings.model_copy(update={"broker_url": broker_url}))
        # Consumed (the list empties), or the process gave up with a non-zero status to be restarted.
        wait_until(lambda: process.poll() is not None or broker.llen(queue) == 0, 90, "the probe to be consumed")
        assert process.poll() in (None, 3), log.read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _children_of(pid: int) -> set[int]:
    """The live processes whose parent is `pid` (from /proc)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.add(int(entry))
    return found


def _start_group(tmp_path, env, settings, broker_url: str, *extra: str):
    """`imagegate worker --processes 2`, returned once both of its processes answer a ping."""
    from imagegate.app.queue import make_celery

    log = tmp_path / "group.log"
    process = start_worker(
        env | {"IMAGEGATE_BROKER_URL": broker_url}, log, "--processes", "2", "--hostname", "group@test", *extra
    )
    control = make_celery(settings.model_copy(update={"broker_url": broker_url})).control

    def both_answer() -> bool:
        assert process.poll() is None, log.read_text()
        replies = control.ping(timeout=1)
        return {name for reply in replies for name in reply} == {"group-0@test", "group-1@test"}

    wait_until(both_answer, 60, "both worker processes")
    return process, log


def test_a_group_of_worker_processes_consumes_as_several_workers_and_stops_as_one(
    tmp_path, env, settings, own_redis, migrated
):
    process, log = _start_group(tmp_path, env, settings, f"{own_redis.url}/0")
    try:
        children = _children_of(process.pid)
        assert len(children) == 2
        os.kill(process.pid, signal.SIGTERM)  # to the parent alone, as Kubernetes or `kill PID` does
        assert process.wait(timeout=60) == 0, log.read_text()
        assert not any(os.path.exists(f"/proc/{child}") for child in children)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert "Traceback" not in log.read_text(), log.read_text()


def test_when_one_worker_process_of_a_group_dies_the_group_exits_for_its_supervisor(
    tmp_path, env, settings, own_redis, migrated
):
    process, log = _start_group(tmp_path, env, settings, f"{own_redis.url}/0")
    try:
        victim, other = sorted(_children_of(process.pid))
        os.kill(victim, signal.SIGKILL)
        assert process.wait(timeout=60) != 0, log.read_text()
        assert not os.path.exists(f"/proc/{other}"), "the other worker process was left running"
        assert "exited with -9; stopping the others" in log.read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_a_group_runs_tasks_and_serves_the_metrics_of_its_processes_summed(
    tmp_path, env, settings, own_redis, migrated
):
    broker_url, metrics_port, api_port = f"{own_redis.url}/0", free_port(), free_port()
    group_env = env | {"IMAGEGATE_BROKER_URL": broker_url}
    process, log = _start_group(tmp_path, env, settings, broker_url, "--metrics-port", str(metrics_port))
    api = start_api(group_env, tmp_path / "api.log", api_port)
    try:
        prompt = f"a group {uuid.uuid4().hex[:8]}"
        headers = {"Authorization": f"Bearer {create_key(group_env, 'group')}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", headers=headers, timeout=30) as client:
            task_ids = [submit_async(client, model="local", prompt=prompt) for _ in range(12)]
            assert all(wait_for_end(client, task_id)["task_status"] == "succeed" for task_id in task_ids)
        with psycopg.connect(settings.database_url.replace("postgresql+psycopg://", "postgresql://")) as db:
            workers = {
                row[0]
                for row in db.execute(
                    "SELECT DISTINCT worker FROM attempts WHERE task_id = ANY(%s::uuid[])", (task_ids,)
                ).fetchall()
            }
        assert workers and workers <= {"group-0@test", "group-1@test"}
        # The parent runs no task: every count it serves is its processes', summed.
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        ended = [
            float(line.rsplit(" ", 1)[1])
            for line in scraped.splitlines()
            if line.startswith("imagegate_tasks_ended_total{") and 'status="succeed"' in line
        ]
        assert sum(ended) == 12, scraped
    finally:
        stop_process(api)
        stop_process(process)
    assert "Traceback" not in log.read_text(), log.read_text()
