"""The worker's Redis transport's acknowledgements (workers/early_acks.py) against a real redis-server: a message
acknowledged soon after delivery leaves no trace in kombu's `unacked` records, one held longer is
recorded as kombu always did (so a dead worker's message comes back after the visibility timeout),
and a consumer that closes hands back what it still holds."""

from __future__ import annotations

import time

import pytest
import redis
from kombu import Connection, Exchange, Queue

from imagegate.workers import early_acks
from imagegate.workers.redis_transport import WorkerRedisTransport

QUEUE = Queue("early-acks", Exchange("early-acks"), routing_key="early-acks")


@pytest.fixture
def broker(own_redis):
    """A redis-server of this test's own: its command counts are this test's alone."""
    url = f"{own_redis.url}/0"
    return url, redis.Redis.from_url(url)


def writes(client: redis.Redis, command: str) -> int:
    return client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)


def publish(url: str, count: int) -> None:
    with Connection(url) as connection, connection.Producer() as producer:
        for index in range(count):
            producer.publish({"n": index}, exchange=QUEUE.exchange, routing_key="early-acks", declare=[QUEUE])


def consume(url: str, count: int, on_message) -> Connection:
    connection = Connection(url, transport=WorkerRedisTransport)
    received = []

    def keep(body, message):
        received.append(message)
        on_message(message)

    consumer = connection.Consumer([QUEUE], callbacks=[keep], prefetch_count=count)
    consumer.consume()
    deadline = time.monotonic() + 10
    while len(received) < count and time.monotonic() < deadline:
        try:
            connection.drain_events(timeout=0.5)
        except TimeoutError:
            pass
    assert len(received) == count
    return connection


def test_messages_acknowledged_at_once_leave_no_unacked_record(broker):
    url, client = broker
    publish(url, 20)
    connection = consume(url, 20, lambda message: message.ack())
    try:
        assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0
        # kombu's own Redis QoS makes 20 HSET + 20 ZADD and 20 HDEL + 20 ZREM here
        assert [writes(client, command) for command in ("hset", "zadd", "hdel", "zrem")] == [0, 0, 0, 0]
        assert client.llen("early-acks") == 0
    finally:
        connection.release()
    assert client.llen("early-acks") == 0  # nothing held: nothing handed back


def test_a_message_held_past_the_hold_is_recorded_and_handed_back_on_close(broker, monkeypatch):
    monkeypatch.setattr(early_acks, "HOLD_S", 0.2)
    url, client = broker
    publish(url, 3)
    held = []
    connection = consume(url, 3, held.append)
    try:
        held[0].ack()  # acknowledged within the hold: never recorded
        time.sleep(0.3)
        held[0].channel.qos.can_consume()  # the consumer's loop asks this every turn
        assert client.hlen("unacked") == 2 and client.zcard("unacked_index") == 2
        held[1].ack()  # recorded, then acknowledged: the record is deleted
        assert client.hlen("unacked") == 1
    finally:
        connection.release()
    assert client.llen("early-acks") == 1 and client.hlen("unacked") == 0  # the last one came back


def test_a_message_closed_before_the_hold_ends_is_handed_back_too(broker):
    url, client = broker
    publish(url, 2)
    connection = consume(url, 2, lambda message: None)
    assert client.hlen("unacked") == 0  # still held back
    connection.release()
    assert client.llen("early-acks") == 2
