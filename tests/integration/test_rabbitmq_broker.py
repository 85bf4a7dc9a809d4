"""RabbitMQ as the broker, one component at a time, on a vhost of each test's own: the queues are
quorum queues, the API's publisher sends what Celery's send_task sends, a message RabbitMQ refuses
is an error at publish (confirms), the sweeper counts the queues and republishes only what was lost,
and /readyz says whether RabbitMQ answers."""

from __future__ import annotations

import uuid

import pytest
from amqp.exceptions import MessageNacked
from kombu import Connection

from imagegate.app.queue import BATCH_QUEUE, QUEUE, RunPublisher, make_celery, publish_run
from imagegate.app.sweeper import make_sweeper
from imagegate.app.web import create_app
from tests.integration.test_sweeper_deficit import pending_tasks
from tests.support.services import free_port


def amqp_settings(settings, broker_url: str, redis_url: str, **more):
    return settings.model_copy(update={"broker_url": broker_url, "redis_url": redis_url, **more})


def take_all(url: str, queue: str) -> list:
    """Every message waiting in `queue`, taken (acknowledged) one by one."""
    taken = []
    with Connection(url) as connection:
        channel = connection.channel()
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            taken.append(message)
    return taken


def comparable(message) -> dict:
    headers = dict(message.headers)
    assert headers["id"] == headers["root_id"] == message.properties["correlation_id"]
    for name in ("id", "root_id", "origin"):
        headers.pop(name)
    properties = {
        name: value
        for name, value in message.properties.items()
        if name not in ("correlation_id", "application_headers")
    }
    return {"body": message.body, "headers": headers, "properties": properties}


def test_the_api_publishes_to_quorum_queues_what_send_task_sends(settings, own_vhost, redis_dbs, rabbitmq):
    celery = make_celery(amqp_settings(settings, own_vhost, redis_dbs[1]))
    publisher = RunPublisher(celery)
    task_id, batch_id = uuid.uuid4(), uuid.uuid4()
    for queue, batch in ((QUEUE, None), (BATCH_QUEUE, batch_id)):
        publish_run(celery, task_id, 1, batch_id=batch)
        publisher.publish(task_id, batch_id=batch)
        publisher.publish(task_id, batch_id=batch)
        expected, *mine = take_all(own_vhost, queue)
        assert [comparable(message) for message in mine] == [comparable(expected)] * 2
        assert mine[0].headers["id"] != mine[1].headers["id"]  # a message id of its own each time
        assert expected.properties["delivery_mode"] == 2  # persistent
    assert rabbitmq.queue_types(own_vhost) == {QUEUE: "quorum", BATCH_QUEUE: "quorum"}


def test_a_message_rabbitmq_refuses_is_an_error_at_publish_not_a_silent_loss(settings, own_vhost, redis_dbs):
    """Publisher confirms: a queue that is full (reject-publish) nacks the message and the publish
    raises, so the caller knows (intake leaves the task pending for the sweeper). Without confirms the
    same publish returns as if all were well. (A classic queue: a quorum queue applies its length
    limit a message late, which is beside the point here.)"""
    with Connection(own_vhost) as admin:
        admin.default_channel.queue_declare(
            "full", durable=True, auto_delete=False, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
        )
    celery = make_celery(amqp_settings(settings, own_vhost, redis_dbs[1]))
    with celery.producer_pool.acquire(block=True) as producer:
        producer.publish({"n": 1}, exchange="", routing_key="full")
        with pytest.raises(MessageNacked):
            producer.publish({"n": 2}, exchange="", routing_key="full")
    with Connection(own_vhost) as unconfirmed:  # kombu's default: no confirms
        unconfirmed.Producer().publish({"n": 3}, exchange="", routing_key="full")
    assert [message.body for message in take_all(own_vhost, "full")] == ['{"n": 1}']


def test_the_sweeper_counts_rabbitmq_queues_and_republishes_only_what_was_lost(
    settings, own_database, own_vhost, redis_dbs
):
    settings = amqp_settings(settings, own_vhost, redis_dbs[1], database_url=own_database, republish_after_s=30.0)
    ids = pending_tasks(own_database, 300, overdue_s=120)
    RunPublisher(make_celery(settings)).publish_all(ids)  # no worker runs: the messages wait in the queue
    sweeper = make_sweeper(settings)

    assert sweeper.sweep_once().republished == 0
    assert sweeper.broker.queued([QUEUE]) == {QUEUE: 300}

    with Connection(own_vhost) as connection:
        channel = connection.channel()
        for _ in range(50):  # 50 messages lost
            assert channel.basic_get(QUEUE, no_ack=True) is not None
    assert sweeper.sweep_once().republished == 50
    assert sweeper.broker.queued([QUEUE]) == {QUEUE: 300}

    with Connection(own_vhost) as connection:
        connection.default_channel.queue_purge(QUEUE)
    assert sweeper.sweep_once().republished == 300 - 50  # the 50 just republished are not overdue yet
    assert sweeper.broker.queued([QUEUE]) == {QUEUE: 250}


def test_readyz_says_whether_rabbitmq_answers(settings, migrated, amqp_url, redis_dbs):
    ready = create_app(amqp_settings(settings, amqp_url, redis_dbs[1])).test_client().get("/readyz")
    assert ready.status_code == 200, ready.get_json()
    assert ready.get_json()["checks"]["broker"] == "ok"

    nobody = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    reply = create_app(amqp_settings(settings, nobody, redis_dbs[1])).test_client().get("/readyz")
    assert reply.status_code == 503
    assert reply.get_json()["checks"]["broker"].startswith("unreachable")
    assert "broker" in reply.get_json()["error"]["message"]
