"""Webhook deliveries cannot slow anyone's images (issue 8): they have a queue and a bounded lane
of their own in the worker, one key gets only a share of the lane, and redeliver is rate-limited."""

from __future__ import annotations

import socket
import threading
import uuid

import httpx
import pytest
from sqlalchemy import create_engine, text

from imagegate.app.models import utcnow
from imagegate.app.queue import make_celery, publish_webhook
from tests.support.flows import submit_async, wait_for_end
from tests.support.processes import create_key
from tests.support.services import wait_until

pytestmark = pytest.mark.e2e


class HungReceiver:
    """An HTTP endpoint on 127.0.0.1 that accepts every connection and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/never-answers"

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(connection)

    def stop(self) -> None:
        self.sock.close()
        for connection in self.accepted:
            connection.close()


@pytest.fixture
def hung_receiver():
    receiver = HungReceiver()
    yield receiver
    receiver.stop()


def test_250_deliveries_to_a_receiver_that_never_answers_do_not_delay_an_image(
    api_url, env, settings, database_url, worker, client, hung_receiver
):
    # A key of its own whose receiver hangs: one finished task, and 250 events about it.
    hung_key = create_key(env, f"hung-{uuid.uuid4().hex[:8]}")
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {hung_key}"}, timeout=60) as hung:
        task_id = submit_async(hung, model="local", prompt="announced 250 times", size="32x32")
        wait_for_end(hung, task_id)
    engine = create_engine(database_url)
    events = [f"msg_{uuid.uuid4().hex}" for _ in range(250)]
    with engine.begin() as connection:
        key_id = connection.execute(text("SELECT api_key_id FROM tasks WHERE id = :id"), {"id": task_id}).scalar_one()
        connection.execute(
            text(
                "INSERT INTO webhook_events (id, api_key_id, type, task_id, url, status, attempts, next_attempt_at,"
                " created_at) VALUES (:id, :key, 'image.task.succeed', :task, :url, 'pending', 0, :now, :now)"
            ),
            [
                {"id": event, "key": key_id, "task": task_id, "url": hung_receiver.url, "now": utcnow()}
                for event in events
            ],
        )
    celery = make_celery(settings)
    try:
        for event in events:
            publish_webhook(celery, event)
        wait_until(lambda: len(hung_receiver.accepted) >= 1, 30, "deliveries to hang")

        # A normal image through the same worker, while those deliveries hang.
        reply = client.post(
            "/v1/images/generations",
            json={"model": "local", "prompt": "not delayed", "size": "32x32", "response_format": "url"},
        )
        assert reply.status_code == 200 and reply.json()["task_status"] == "succeed", reply.text

        # It ended while every hung delivery was still outstanding: no attempt has ended yet
        # (each waits IMAGEGATE_WEBHOOK_TIMEOUT_S for its receiver), none delivered.
        with engine.connect() as connection:
            attempts_ended = connection.execute(
                text("SELECT count(*) FROM webhook_deliveries WHERE event_id = ANY(:ids)"), {"ids": events}
            ).scalar_one()
            states = dict(
                connection.execute(
                    text("SELECT status, count(*) FROM webhook_events WHERE id = ANY(:ids) GROUP BY status"),
                    {"ids": events},
                ).all()
            )
        assert attempts_ended == 0
        assert states.get("sending", 0) >= 1 and states.get("delivered", 0) == 0, states
        # And the key had only its share of the lane; the rest waits in the outbox, not dropped.
        assert 1 <= len(hung_receiver.accepted) <= settings.webhook_max_pending_per_key
        assert states.get("sending", 0) <= settings.webhook_max_pending_per_key
        assert states.get("pending", 0) + states.get("sending", 0) == 250, states
    finally:
        with engine.begin() as connection:  # stop them: no sweeper runs in this session
            connection.execute(
                text("UPDATE webhook_events SET status = 'failed' WHERE id = ANY(:ids)"), {"ids": events}
            )
        engine.dispose()


def test_redeliver_is_rate_limited_per_key(settings, redis_dbs, migrated, env):
    from imagegate.app.web import create_app

    app = create_app(settings.model_copy(update={"broker_url": redis_dbs[1], "redeliver_rate": "3/minute"}))
    limited, other = (create_key(env, f"redeliver-{uuid.uuid4().hex[:8]}") for _ in range(2))
    with app.test_client() as http:

        def redeliver(key: str):
            return http.post(
                f"/v1/webhooks/deliveries/{uuid.uuid4()}/redeliver", headers={"Authorization": f"Bearer {key}"}
            )

        assert [redeliver(limited).status_code for _ in range(3)] == [404] * 3
        refused = redeliver(limited)
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        error = refused.get_json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
        assert set(error) == {"message", "type", "param", "code"}
        assert redeliver(other).status_code == 404  # another key has its own allowance
