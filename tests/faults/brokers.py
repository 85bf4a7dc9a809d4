"""The brokers the fault scenarios break, behind one face: a Redis or RabbitMQ server of the test's
own (never the machine's), how many messages wait in a queue, and the two faults: everything queued
lost (Redis FLUSHALL, a RabbitMQ queue purged) and a restart."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis
from kombu import Connection

from imagegate.app.queue import QUEUE
from imagegate.app.rabbitmq import AmqpBroker
from tests.support.services import RabbitMQ, Throwaway


@dataclass
class RedisUnderTest:
    server: Throwaway
    name: str = "redis"

    @property
    def env(self) -> dict[str, str]:
        return {"IMAGEGATE_BROKER_URL": f"{self.server.url}/0"}

    def queued(self, queue: str) -> int:
        return redis.Redis.from_url(f"{self.server.url}/0").llen(queue)

    def lose_everything(self) -> str:
        redis.Redis.from_url(f"{self.server.url}/0").flushall()
        return "Redis FLUSHALL"

    def restart(self) -> str:
        self.server.pause()  # redis-server keeps nothing here: it comes back empty
        self.server.resume()
        return "Redis restarted"


@dataclass
class RabbitMQUnderTest:
    node: RabbitMQ
    redis_server: Throwaway  # the wake-ups and shared counters
    name: str = "rabbitmq"
    url: str = field(init=False)

    def __post_init__(self) -> None:
        self.url = self.node.add_vhost()

    @property
    def env(self) -> dict[str, str]:
        return {"IMAGEGATE_BROKER_URL": self.url, "IMAGEGATE_REDIS_URL": f"{self.redis_server.url}/0"}

    def queued(self, queue: str) -> int:
        counter = AmqpBroker(self.url)
        try:
            return counter.queued([queue])[queue]
        finally:
            counter.close()

    def lose_everything(self) -> str:
        with Connection(self.url) as connection:
            connection.default_channel.queue_purge(QUEUE)  # the only queue yet: no worker declared the rest
        return "RabbitMQ queue purged"

    def restart(self) -> str:
        self.node.pause()  # the whole node: its Erlang VM stops and its port closes
        self.node.resume()
        return "RabbitMQ node restarted"
