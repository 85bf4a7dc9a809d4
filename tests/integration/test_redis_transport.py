"""The worker's Redis transport takes messages several at a time (workers/redis_transport.py),
against a real redis-server: every message arrives once and in order, in fewer round trips than
messages, never more than the prefetch window has room for; the queues still take turns; and a
Redis without BLMPOP still delivers, one message at a time."""

from __future__ import annotations

import time

import pytest
import redis
from kombu import Connection, Exchange, Queue

from imagegate.workers.redis_transport import RECEIVE_MAX, WorkerRedisTransport
from tests.support.services import start_redis

BATCH = Queue("bulk-batch", Exchange("bulk-batch"), routing_key="bulk-batch")
SYNC = Queue("bulk-sync", Exchange("bulk-sync"), routing_key="bulk-sync")


def publish(url: str, queue: Queue, count: int, first: int = 0) -> None:
    with Connection(url) as connection, connection.Producer() as producer:
        for index in range(first, first + count):
            producer.publish({"n": index}, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue])


def receive(url: str, queues: list[Queue], *, prefetch: int, until: int, wait_s: float = 5) -> tuple[list, Connection]:
    """Drain until `until` messages arrived or `wait_s` passed; nothing is acknowledged."""
    connection = Connection(url, transport=WorkerRedisTransport)
    received: list = []
    consumer = connection.Consumer(queues, callbacks=[lambda body, message: received.append(body["n"])])
    consumer.qos(prefetch_count=prefetch)
    consumer.consume()
    deadline = time.monotonic() + wait_s
    while len(received) < until and time.monotonic() < deadline:
        try:
            connection.drain_events(timeout=0.2)
        except TimeoutError:
            pass
    return received, connection


def calls(client: redis.Redis, command: str) -> int:
    return client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)


@pytest.fixture
def broker(own_redis):
    url = f"{own_redis.url}/0"
    return url, redis.Redis.from_url(url)


def test_a_backlog_arrives_in_order_several_messages_a_round_trip(broker):
    url, client = broker
    publish(url, BATCH, 40)
    received, connection = receive(url, [BATCH], prefetch=100, until=40)
    try:
        assert received == list(range(40))
        # 16 + 16 + 8: kombu's channel made one BRPOP per message
        assert calls(client, "blmpop") <= 4 and calls(client, "brpop") == 0
    finally:
        connection.release()


def test_never_more_than_the_prefetch_window_has_room_for(broker):
    url, client = broker
    publish(url, BATCH, 20)
    received, connection = receive(url, [BATCH], prefetch=5, until=20, wait_s=1.5)
    try:
        assert received == list(range(5))
        assert client.llen("bulk-batch") == 15
    finally:
        connection.release()
    assert client.llen("bulk-batch") == 20  # what it held was handed back, nothing lost


def test_a_request_behind_a_batch_waits_for_one_take_at_most(broker):
    url, _ = broker
    publish(url, BATCH, 40)
    publish(url, SYNC, 1, first=1000)
    # The batch's queue is asked first: one take of the batch, then the other queue's turn.
    received, connection = receive(url, [BATCH, SYNC], prefetch=100, until=41)
    try:
        assert sorted(received) == list(range(40)) + [1000]
        assert received.index(1000) == RECEIVE_MAX
    finally:
        connection.release()


def test_a_redis_without_blmpop_still_delivers_one_at_a_time():
    server = start_redis("--rename-command", "BLMPOP", "")
    try:
        url = f"{server.url}/0"
        client = redis.Redis.from_url(url)
        publish(url, BATCH, 10)
        received, connection = receive(url, [BATCH], prefetch=100, until=10)
        try:
            assert received == list(range(10))
            assert calls(client, "brpop") >= 10
        finally:
            connection.release()
    finally:
        server.stop()
