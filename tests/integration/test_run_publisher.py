"""The API's RunPublisher sends the very message publish_run (Celery's send_task) sends, with ids of
its own per message: the worker takes both alike (tests/e2e run a worker on what the API publishes)."""

from __future__ import annotations

import base64
import json
import uuid

import redis

from imagegate.app.queue import (
    BATCH_QUEUE,
    QUEUE,
    RunPublisher,
    make_celery,
    publish_run,
    reuse_publish_client,
)


def _comparable(raw: bytes) -> tuple[dict, str]:
    message = json.loads(raw)
    message["body"] = json.loads(base64.b64decode(message["body"]))
    headers, properties = message["headers"], message["properties"]
    message_id = headers["id"]
    assert headers["root_id"] == properties["correlation_id"] == message_id
    for name in ("id", "root_id", "origin"):
        headers.pop(name)
    properties.pop("correlation_id"), properties.pop("delivery_tag")
    return message, message_id


def test_run_publisher_sends_what_send_task_sends(settings, own_redis):
    settings = settings.model_copy(update={"broker_url": f"{own_redis.url}/0"})
    celery = make_celery(settings)
    reuse_publish_client(celery)  # as the API does
    broker = redis.Redis.from_url(settings.broker_url)
    publisher = RunPublisher(celery)
    task_id, batch_id = uuid.uuid4(), uuid.uuid4()

    for queue, batch in ((QUEUE, None), (BATCH_QUEUE, batch_id)):
        publish_run(celery, task_id, 1, batch_id=batch)
        publisher.publish(task_id, batch_id=batch)
        publisher.publish(task_id, batch_id=batch)
        publisher.publish_all([task_id], batch_id=batch)  # a batch's way
        (expected, _), *mine = [_comparable(raw) for raw in reversed(broker.lrange(queue, 0, -1))]
        assert [message for message, _ in mine] == [expected, expected, expected]
        assert expected["body"][0] == [str(task_id), 1]
        assert len({message_id for _, message_id in mine}) == 3  # a message id of its own each time
