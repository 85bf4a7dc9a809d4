"""The webhook event transitions against real Postgres: an event is claimed once, its attempt is
fenced by its lease, it ends only in an end state, and a redelivery waits for a running attempt."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select

from imagegate.app.db import make_sessionmaker
from imagegate.app.models import WebhookDelivery, WebhookEvent, utcnow
from imagegate.app.state import webhook_events as transitions
from imagegate.app.state.refused import Refused
from imagegate.app.state.webhook_events import EventStatus
from imagegate.app.stores.webhooks import WebhookStore


@pytest.fixture(scope="module")
def webhooks(engine):
    return WebhookStore(make_sessionmaker(engine))


def new_event(engine, key_id) -> str:
    row = transitions.new_event(
        api_key_id=key_id, type="image.task.succeed", url="https://hooks.example/e", now=utcnow(), task_id=uuid.uuid4()
    )
    with engine.begin() as connection:
        transitions.enqueue(connection, [row])
    return row["id"]


def event_row(engine, event_id):
    with engine.connect() as connection:
        return connection.execute(select(WebhookEvent.__table__).where(WebhookEvent.id == event_id)).one()


def test_an_event_is_claimed_once(webhooks, engine, key_id):
    event_id = new_event(engine, key_id)
    claimed = webhooks.claim(event_id, lease_s=60)
    assert claimed and claimed.attempt == 1 and event_row(engine, event_id).status == EventStatus.SENDING
    assert webhooks.claim(event_id, lease_s=60) is Refused.ALREADY_CLAIMED
    assert webhooks.claim("msg_missing", lease_s=60) is Refused.NOT_FOUND


def test_a_delivered_event_is_done(webhooks, engine, key_id):
    event = webhooks.claim(new_event(engine, key_id), lease_s=60)
    assert webhooks.record(event, status_code=200, latency_ms=5, error=None, outcome=EventStatus.DELIVERED) is True
    assert event_row(engine, event.id).status == EventStatus.DELIVERED
    assert webhooks.claim(event.id, lease_s=60) is Refused.ALREADY_ENDED
    assert (
        webhooks.record(event, status_code=200, latency_ms=5, error=None, outcome=EventStatus.DELIVERED)
        is Refused.ALREADY_ENDED
    )


def test_a_sender_whose_lease_was_taken_back_records_its_attempt_but_moves_nothing(webhooks, engine, key_id):
    event = webhooks.claim(new_event(engine, key_id), lease_s=-1)  # its lease is already over
    assert event.id in webhooks.overdue(republish_after_s=30)
    assert event_row(engine, event.id).status == EventStatus.PENDING
    again = webhooks.claim(event.id, lease_s=60)
    assert again.attempt == 2
    assert (
        webhooks.record(event, status_code=500, latency_ms=5, error=None, outcome=EventStatus.FAILED)
        is Refused.STALE_ATTEMPT
    )
    assert event_row(engine, event.id).status == EventStatus.SENDING
    retry_at = utcnow() + timedelta(seconds=5)
    assert (
        webhooks.record(
            again, status_code=500, latency_ms=5, error=None, outcome=EventStatus.PENDING, retry_at=retry_at
        )
        is True
    )
    row = event_row(engine, event.id)
    assert (row.status, row.attempts, row.next_attempt_at) == (EventStatus.PENDING, 2, retry_at)
    with engine.connect() as connection:
        recorded = connection.scalars(select(WebhookDelivery.attempt).where(WebhookDelivery.event_id == event.id))
        assert sorted(recorded) == [1, 2]


def test_an_event_cannot_end_pending_or_sending(engine, key_id):
    event_id = new_event(engine, key_id)
    with engine.begin() as connection:
        for status in (EventStatus.PENDING, EventStatus.SENDING):
            with pytest.raises(ValueError):
                transitions.finish(connection, event_id, 1, status)


def test_a_redelivery_waits_for_a_running_attempt(webhooks, engine, key_id):
    event = webhooks.claim(new_event(engine, key_id), lease_s=60)
    with engine.begin() as connection:
        assert transitions.redeliver(connection, event.id, now=utcnow()) is Refused.ALREADY_CLAIMED
    webhooks.record(event, status_code=500, latency_ms=5, error=None, outcome=EventStatus.FAILED)
    with engine.begin() as connection:
        assert transitions.redeliver(connection, event.id, now=utcnow()) is True
        assert transitions.redeliver(connection, "msg_missing", now=utcnow()) is Refused.NOT_FOUND
    assert event_row(engine, event.id).status == EventStatus.PENDING
