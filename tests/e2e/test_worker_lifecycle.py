"""The worker process as its supervisor sees it: a clean stop exits 0 with no traceback, and a
worker whose broker went away and came back consumes again (or exits for a restart)."""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest
import redis

from imagegate.app.queue import QUEUE
from tests.support.processes import start_worker
from tests.support.services import wait_until


@pytest.mark.parametrize("pool", ["gevent", "threads"])
def test_sigterm_stops_an_idle_worker_cleanly(tmp_path, env, redis_dbs, migrated, pool):
    log = tmp_path / "worker.log"
    # The idle Redis db: nothing of the other tests reaches this worker.
    process = start_worker(env | {"IMAGEGATE_BROKER_URL": redis_dbs[1]}, log, "--pool", pool)
    try:
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    output = log.read_text()
    assert "Traceback" not in output and "BlockingSwitchOutError" not in output, output


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
        for queue in WORKER_QUEUES:
            replies = control.cancel_consumer(queue, destination=["stalled@test"], reply=True, timeout=5)
            assert replies, f"the worker did not answer cancel_consumer({queue})"
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
