"""Countdowns on RabbitMQ go through native delayed delivery, which counts whole seconds and
refuses a delay under one: such a countdown is rounded up, never down, so a retry is never early."""

from __future__ import annotations

import pytest

from imagegate.app.rabbitmq import countdown_for
from imagegate.app.settings import Settings, SettingsError


@pytest.mark.parametrize(
    ("broker", "asked", "sent"),
    [
        ("amqp://guest:guest@rabbit:5672/imagegate", 0.2, 1.0),
        ("amqp://guest:guest@rabbit:5672/imagegate", 2.5, 2.5),  # whole seconds in RabbitMQ, the rest in the worker
        ("amqp://guest:guest@rabbit:5672/imagegate", None, None),
        ("amqp://guest:guest@rabbit:5672/imagegate", 0, 0),
        ("redis://127.0.0.1:6379/0", 0.2, 0.2),
    ],
)
def test_a_countdown_is_never_shortened(broker, asked, sent):
    assert countdown_for(broker, asked) == sent


def test_a_rabbitmq_broker_needs_a_redis_for_the_wakeups():
    settings = Settings(secret_key="x" * 40, broker_url="amqp://guest:guest@rabbit:5672/imagegate")
    with pytest.raises(SettingsError, match="IMAGEGATE_REDIS_URL"):
        settings.check()
    paired = settings.model_copy(update={"redis_url": "redis://redis:6379/0"}).check()
    assert paired.shared_redis_url == "redis://redis:6379/0"
    assert Settings(broker_url="redis://redis:6379/2").shared_redis_url == "redis://redis:6379/2"
