"""RabbitMQ as the broker (IMAGEGATE_BROKER_URL=amqp://...): what differs from Redis.

- The three queues are quorum queues (replicated, on disk): a message RabbitMQ confirmed survives a
  node's restart. Each has a topic exchange of its own, which native delayed delivery needs.
- Publisher confirms: a publish returns once RabbitMQ holds the message, or raises; a task whose
  publish failed is still pending in Postgres, and the sweeper publishes it again.
- Countdowns (retries, upstream polls, webhook retries) use Celery's native delayed delivery: the
  message waits in RabbitMQ's `celery_delayed_*` quorum queues (per-message TTL, then dead-lettered
  to its queue), not unacknowledged in a worker. So no visibility timeout, no consumer_timeout and
  no prefetch window bounds a countdown, and a worker killed holds none. It counts whole seconds:
  the worker holds the message for the fraction left (under a second), and a countdown under one
  second becomes one second (Celery refuses it otherwise), so a message is never early.
- Fairness: a worker consumes its queues with a prefetch window each (quorum queues have no
  channel-wide prefetch), so a single request waits behind at most one window of a batch.
- What is not a task message stays in Redis (IMAGEGATE_REDIS_URL): the task-ended wake-ups and the
  shared rate-limit counters.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from kombu import Connection, Exchange, Queue
from kombu.exceptions import OperationalError

from imagegate.app.settings import is_amqp_url

log = logging.getLogger(__name__)

QUORUM = {"x-queue-type": "quorum"}
_T = TypeVar("_T")


def queues(names: Iterable[str]) -> tuple[Queue, ...]:
    """Durable quorum queues, each bound to a topic exchange of its name with its name as key."""
    return tuple(
        Queue(name, Exchange(name, type="topic", durable=True), routing_key=name, durable=True, queue_arguments=QUORUM)
        for name in names
    )


def celery_config(queue_names: Iterable[str], default_queue: str) -> dict[str, Any]:
    """What a RabbitMQ broker adds to the shared Celery configuration (both the API and the worker
    declare the queues, so both must declare them alike)."""
    return {
        "task_queues": queues(queue_names),
        "task_default_exchange": default_queue,
        "task_default_exchange_type": "topic",
        "task_default_routing_key": default_queue,
        "broker_transport_options": {"confirm_publish": True},
        # Native delayed delivery's own queues are quorum queues too (Celery's default, said here).
        "broker_native_delayed_delivery_queue_type": "quorum",
        "worker_detect_quorum_queues": True,
        # Said explicitly (Celery warns otherwise): a connection lost does not cancel running tasks.
        # run_task was acknowledged at its start anyway; a webhook hand-over returns at once.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }


def countdown_for(broker_url: object, countdown: float | None) -> float | None:
    """Native delayed delivery counts whole seconds and refuses a delay under one: round such a
    countdown up to one second, never down."""
    if countdown is not None and 0 < countdown < 1 and is_amqp_url(broker_url):
        return 1.0
    return countdown


class AmqpBroker:
    """Queue depths and a reachability check, over a connection of its own (not Celery's). A
    passive queue.declare answers with the messages ready in a queue (not those delivered to a
    worker and unacknowledged, which RabbitMQ does not show over AMQP). One caller at a time: the
    sweeper's passes and its metrics scrapes share it."""

    def __init__(self, url: str, timeout_s: float = 3.0):
        self.url, self.timeout_s = url, timeout_s
        self._connection: Connection | None = None
        self._lock = threading.Lock()

    def queued(self, names: list[str]) -> dict[str, int]:
        return self._call(lambda connection: {name: _ready(connection, name) for name in names})

    def ping(self) -> None:
        self._call(lambda connection: connection.channel().close())

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _call(self, function: Callable[[Connection], _T]) -> _T:
        """Run `function` on the kept connection; a connection broken since (RabbitMQ restarted) is
        made again once before the error is the caller's."""
        with self._lock:
            for last_try in (False, True):
                try:
                    if self._connection is None:
                        self._connection = Connection(
                            self.url,
                            connect_timeout=self.timeout_s,
                            transport_options={"read_timeout": self.timeout_s, "write_timeout": self.timeout_s},
                        )
                        self._connection.connect()
                    return function(self._connection)
                except Exception as exc:
                    self._drop()
                    if last_try:  # as kombu's own: one error type for callers (and the CLI's one line)
                        raise OperationalError(f"{type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable")

    def _drop(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except Exception:  # already broken: nothing to close
                pass
            self._connection = None


def _ready(connection: Connection, name: str) -> int:
    from amqp.exceptions import NotFound

    channel = connection.channel()
    try:
        return channel.queue_declare(queue=name, passive=True).message_count
    except NotFound:  # not declared yet (no worker has started on this vhost): nothing waits in it
        return 0
    finally:
        try:
            channel.close()
        except Exception:  # a 404 closed it already
            pass
