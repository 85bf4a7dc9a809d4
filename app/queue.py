"""The Celery side both processes share: configuration, the task name, and publishing.

The web process publishes by task name only; the task bodies live in `workers/`.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

from celery import Celery

from imagegate.app import rabbitmq
from imagegate.app.grouping import Grouped
from imagegate.app.settings import Settings, is_amqp_url, is_redis_url

RUN_TASK = "imagegate.run_task"
DELIVER_WEBHOOK = "imagegate.deliver_webhook"
QUEUE = "imagegate"
# Batch tasks wait in a queue of their own; a worker takes from both queues in turn, so a single
# request is never stuck behind a 10 000-task batch.
BATCH_QUEUE = "imagegate.batch"
REDIS_MAX_CONNECTIONS = 2000
# Webhook deliveries have a queue of their own and a bounded lane in the worker, so no receiver,
# however slow, holds a slot that image work needs.
WEBHOOK_QUEUE = "imagegate.webhooks"
WORKER_QUEUES = (QUEUE, BATCH_QUEUE, WEBHOOK_QUEUE)
# How kombu's Redis transport names what it holds: one list per priority step ("name", then
# "name\x06\x163", ...), and one hash of the messages delivered to a worker and not yet acknowledged,
# each value a JSON [message, exchange, routing_key].
_PRIORITY_STEPS = (0, 3, 6, 9)
_PRIORITY_SEPARATOR = "\x06\x16"
_UNACKED_HASH = "unacked"
_UNACKED_INDEX = "unacked_index"  # delivery tag -> when it was delivered


def celery_config(settings: Settings) -> dict[str, Any]:
    transport_options: dict[str, Any] = {
        "visibility_timeout": settings.visibility_timeout_s,
        # Redis connections a process may open (lazily) for publishing and acknowledging. kombu's
        # default of 10 made a worker with hundreds of tasks starting at once fail its acks.
        "max_connections": REDIS_MAX_CONNECTIONS,
    }
    if settings.uses_filesystem:
        folder = str(settings.data_dir / "broker")  # type: ignore[operator]
        transport_options |= {
            "data_folder_in": folder,
            "data_folder_out": folder,
            "store_processed": False,
            # How often an idle worker looks for a new message (kombu's default is every second):
            # each look lists a folder, and a synchronous request waited for it.
            "polling_interval": 0.1,
            # kombu's exchange tables (remote control): ./control in the working directory otherwise.
            "control_folder": str(settings.data_dir / "broker-control"),  # type: ignore[operator]
        }
    config = {
        "broker_url": settings.broker_url,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        # With the broker down, give up publishing within a few seconds: the task is committed
        # pending, the client gets its id, and the sweeper publishes it once the broker is back.
        "broker_connection_timeout": 3,
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
        "task_default_queue": QUEUE,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_backend": None,  # results live in the database, not in Celery
        "task_ignore_result": True,
        # At-least-once: acknowledge after the task ran, hand the message back if the worker dies,
        # and take one message at a time so a dying worker strands as few as possible.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.task_time_limit_s,
        "task_soft_time_limit": max(1, settings.task_time_limit_s - 30),
        "worker_hijack_root_logger": False,
        # Task events (received, started, succeeded, failed) for Flower and `celery events`. Only the
        # worker's: task-sent events would cost every publish at intake another Redis round trip.
        "worker_send_task_events": not settings.uses_filesystem,
        # Remote control (`celery inspect`, `celery control`) over a filesystem broker is a thread
        # polling a folder every second, and stopping it held up the embedded worker's stop by a second.
        "worker_enable_remote_control": not settings.uses_filesystem,
    }
    if settings.uses_amqp:  # quorum queues, publisher confirms, countdowns held by RabbitMQ
        config |= rabbitmq.celery_config(WORKER_QUEUES, QUEUE)
    return config


def make_celery(settings: Settings) -> Celery:
    app = Celery("imagegate", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def queue_of(batch_id: uuid.UUID | None) -> str:
    return BATCH_QUEUE if batch_id else QUEUE


def publish_run(
    celery: Celery,
    task_id: uuid.UUID,
    attempt: int,
    countdown: float | None = None,
    poll: int = 0,
    *,
    batch_id: uuid.UUID | None = None,
) -> None:
    """Ask a worker for attempt `attempt` of a task (or for poll step `poll` of that attempt)."""
    args = [str(task_id), attempt] + ([poll] if poll else [])
    countdown = rabbitmq.countdown_for(celery.conf.broker_url, countdown)
    celery.send_task(RUN_TASK, args=args, countdown=countdown, queue=queue_of(batch_id))


# Concurrent requests' first-attempt messages published together, at most this many in one group.
MAX_PUBLISH_GROUP = 64


class RunPublisher:
    """First attempts published by the API, one per async or sync submit (and a batch's, all at
    once: `publish_all`): the message `publish_run` sends, cheaper. send_task routes, builds the
    headers through Celery's amqp layer, takes a producer (and often a new channel) from a pool
    and makes a result object on every call: ~half of a publish's CPU besides the LPUSH. Here the
    process keeps one producer, and Celery's own send_task builds the message once per queue (into
    a stand-in producer); each publish copies it with the task's ids.

    Concurrent publishes go out in groups (app/grouping.py): on Redis a group is one pipeline of
    LPUSHes (kombu's publish batch), one round trip whatever its size. An AMQP channel is one
    conversation (and with publisher confirms each publish waits for its confirm), so on RabbitMQ a
    group takes one producer from Celery's pool and publishes its messages one by one; kombu
    reconnects it if RabbitMQ restarted. Built lazily: nothing connects at start."""

    def __init__(self, celery: Celery) -> None:
        self._celery = celery
        self._producer: Any = None
        self._shapes: dict[str, tuple[Any, dict[str, Any]]] = {}
        self._pooled = is_amqp_url(celery.conf.broker_url)
        self._grouped: Grouped[tuple[Any, dict[str, Any]], None] = Grouped(
            self._publish_many, max_group=MAX_PUBLISH_GROUP
        )

    def publish(self, task_id: uuid.UUID, *, batch_id: uuid.UUID | None = None, awaited: bool = False) -> None:
        """Attempt 1 of `task_id`: the message `publish_run(celery, task_id, 1)` sends. Returns once
        it is in the broker; raises when that is not certain (the caller leaves the task to the
        sweeper). `awaited`: a synchronous request waits for it and would take its reply handed
        over (app/wakeups.py)."""
        self._grouped(self._message(task_id, queue_of(batch_id), awaited=awaited))

    def publish_many(self, task_ids: list[uuid.UUID]) -> list[Exception | None]:
        """Attempt 1 of each task (none of a batch) at once, not waiting for other callers: one outcome
        per task, None once its message is in the broker."""
        if not task_ids:
            return []
        try:
            return self._publish_many([self._message(task_id, QUEUE) for task_id in task_ids])
        except Exception as exc:  # the group's pipeline failed: none of them is certain
            return [exc] * len(task_ids)

    def publish_all(
        self,
        task_ids: list[uuid.UUID],
        *,
        batch_id: uuid.UUID | None = None,
        chunk: int = 500,
        between_chunks: Callable[[], None] | None = None,
    ) -> None:
        """Attempt 1 of many tasks (a batch's thousands), not grouped with other callers: a producer
        of Celery's pool (not the one the submits share), and kombu's publish batch, which sends each
        chunk to Redis in one pipeline. The copies of the template cost 1.85 s of CPU for 10,000
        messages where send_task for each took 3.3 s. between_chunks runs after each chunk (the API
        yields to other requests)."""
        queue = queue_of(batch_id)
        with self._celery.producer_or_acquire() as producer:
            for start in range(0, len(task_ids), chunk):
                with producer.batch(max_size=chunk):
                    for task_id in task_ids[start : start + chunk]:
                        body, options = self._message(task_id, queue)
                        producer.publish(body, **options)
                if between_chunks is not None:
                    between_chunks()

    def _message(self, task_id: uuid.UUID, queue: str, *, awaited: bool = False) -> tuple[Any, dict[str, Any]]:
        shape = self._shapes.get(queue) or self._shape(queue)
        args = [str(task_id), 1]
        (_, kwargs, embed), options = shape
        kwargs = {**kwargs, "awaited": True} if awaited else kwargs  # run_task's keyword
        message_id = str(uuid.uuid4())
        headers = {
            **options["headers"],
            "id": message_id,
            "root_id": message_id,
            "argsrepr": repr(args),
            "kwargsrepr": repr(kwargs),
        }
        return (args, kwargs, embed), {**options, "headers": headers, "correlation_id": message_id}

    def _publish_many(self, messages: list[tuple[Any, dict[str, Any]]]) -> list[Exception | None]:
        if self._pooled:
            outcomes: list[Exception | None] = []
            with self._celery.producer_pool.acquire(block=True) as producer:
                for body, options in messages:
                    try:
                        producer.publish(body, **options)
                        outcomes.append(None)
                    except Exception as exc:  # that message alone; the others may still go
                        outcomes.append(exc)
            return outcomes
        if self._producer is None:
            self._producer = self._celery.connection_for_write().Producer()
        if len(messages) == 1:  # alone: kombu's publish, with its retry policy
            body, options = messages[0]
            self._producer.publish(body, **options)
            return [None]
        with self._producer.batch(max_size=len(messages)):
            for body, options in messages:
                self._producer.publish(body, **options)
        return [None] * len(messages)

    def _shape(self, queue: str) -> tuple[Any, dict[str, Any]]:
        sent = _Capture(self._celery.connection_for_write())
        self._celery.send_task(RUN_TASK, args=["template", 1], queue=queue, producer=sent)
        body, options = sent.message
        # Any other id-bearing field would be copied from the template to every message: refuse.
        assert options["headers"]["id"] == options["headers"]["root_id"] == options["correlation_id"], options
        if is_redis_url(self._celery.conf.broker_url):
            # Sent to the default exchange, a message is pushed onto the list its routing key names,
            # declared or not; kombu's check of the declaration copied the queue for every message
            # (16% of a batch's publishing). RabbitMQ keeps it: there an undeclared queue drops it.
            options = {name: value for name, value in options.items() if name != "declare"}
        self._shapes[queue] = body, options
        return body, options


class _Capture:
    """Stands in for a kombu Producer: keeps what send_task would publish."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.message: tuple[Any, dict[str, Any]] | None = None

    def publish(self, body: Any, **options: Any) -> None:
        self.message = body, options


def publish_webhook(celery: Celery, event_id: str, countdown: float | None = None) -> None:
    countdown = rabbitmq.countdown_for(celery.conf.broker_url, countdown)
    celery.send_task(DELIVER_WEBHOOK, args=[event_id], countdown=countdown, queue=WEBHOOK_QUEUE)


def messages_queued(broker: Any, queues: list[str]) -> dict[str, int]:
    """How many messages wait in the broker for each queue. `broker` is a redis client (the lists
    kombu keeps) or a rabbitmq.AmqpBroker (the queues' ready messages)."""
    if isinstance(broker, rabbitmq.AmqpBroker):
        return broker.queued(queues)
    pipe = broker.pipeline(transaction=False)
    for queue in queues:
        for step in _PRIORITY_STEPS:
            pipe.llen(f"{queue}{_PRIORITY_SEPARATOR}{step}" if step else queue)
    lengths = pipe.execute()
    steps = len(_PRIORITY_STEPS)
    return {queue: sum(lengths[i * steps : (i + 1) * steps]) for i, queue in enumerate(queues)}


def messages_unacked(broker: Any, queues: list[str], *, delivered_within_s: float) -> dict[str, list[str]]:
    """The first argument (task or event id) of each message a worker took from these queues in the
    last `delivered_within_s` seconds and has not acknowledged. Kept apart from the lists' counts: an
    entry can outlive its task (an ack that never reached Redis), or its worker (a worker killed with
    messages reserved leaves them here until the visibility timeout, an hour), so it is worth
    something only while recent and while its task still waits. RabbitMQ does not show its
    unacknowledged messages over AMQP: none are listed, so the sweeper may republish the task of a
    message a worker holds, which its claim then ignores as a duplicate."""
    found: dict[str, list[str]] = {queue: [] for queue in queues}
    if isinstance(broker, rabbitmq.AmqpBroker):
        return found
    tags = broker.zrangebyscore(_UNACKED_INDEX, time.time() - delivered_within_s, "+inf")
    for start in range(0, len(tags), 1000):
        for value in broker.hmget(_UNACKED_HASH, tags[start : start + 1000]):
            try:
                message, _, routing_key = json.loads(value)
                if routing_key in found:
                    found[routing_key].append(str(json.loads(base64.b64decode(message["body"]))[0][0]))
            except (ValueError, IndexError, KeyError, TypeError):
                continue
    return found


def broker_client(settings: Settings, timeout_s: float = 3.0) -> Any:
    """What counts the broker's messages (messages_queued): a redis client, a rabbitmq.AmqpBroker,
    or None for the filesystem broker. Connects on first use."""
    if settings.uses_redis:
        import redis

        return redis.Redis.from_url(settings.broker_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    if settings.uses_amqp:
        return rabbitmq.AmqpBroker(settings.broker_url, timeout_s)
    return None


def reuse_publish_client(celery: Celery) -> None:
    """Make `celery` publish through PublishingRedisTransport (the API process: a publish per request)."""
    if is_redis_url(celery.conf.broker_url):
        celery.conf.broker_transport = f"{__name__}:PublishingRedisTransport"


def _publishing_redis_transport() -> type:
    from kombu.transport import redis as kombu_redis

    class PublishingChannel(kombu_redis.Channel):
        """kombu's Redis channel builds a new redis client object for every message it publishes
        (~20% of a publish's CPU); this one keeps one per channel. A channel belongs to one producer,
        which one request holds at a time, and the client takes its connections from the channel's pool."""

        _publisher = None

        @contextmanager
        def conn_or_acquire(self, client=None):
            if client is None:
                if self._publisher is None:
                    self._publisher = self._create_client()
                client = self._publisher
            yield client

    class Transport(kombu_redis.Transport):
        Channel = PublishingChannel

    return Transport


def __getattr__(name: str) -> Any:
    # Built on first use: importing kombu's Redis transport needs the redis package.
    if name == "PublishingRedisTransport":
        return _publishing_redis_transport()
    raise AttributeError(name)
