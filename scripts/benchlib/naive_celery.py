"""Naive baseline (a): a plain Celery task that calls the upstream with httpx, decodes the image
and INSERTs it into Postgres. Run with `celery -A benchlib.naive_celery worker --pool threads`.

Environment: NAIVE_BROKER_URL, NAIVE_DATABASE_URL, NAIVE_UPSTREAM_URL."""

from __future__ import annotations

import base64
import os
import threading

import httpx
import sqlalchemy as sa
from celery import Celery

QUEUE = "naive"
celery = Celery("naive", broker=os.environ.get("NAIVE_BROKER_URL", "memory://"))
celery.conf.update(task_default_queue=QUEUE, worker_hijack_root_logger=False)

_lock = threading.Lock()
_shared: dict = {}


def _resources():
    with _lock:
        if not _shared:
            _shared["http"] = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=200))
            _shared["db"] = sa.create_engine(os.environ["NAIVE_DATABASE_URL"], pool_size=64, max_overflow=16)
        return _shared["http"], _shared["db"]


@celery.task(name="naive.generate")
def generate(task_id: str, prompt: str) -> None:
    http, db = _resources()
    reply = http.post(os.environ["NAIVE_UPSTREAM_URL"], json={"model": "bench", "prompt": prompt})
    reply.raise_for_status()
    png = base64.b64decode(reply.json()["data"][0]["b64_json"])
    if not png.startswith(b"\x89PNG"):
        raise ValueError("not a PNG")
    with db.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO naive_images (task_id, data) VALUES (:task_id, :data)"),
            {"task_id": task_id, "data": png},
        )


SCHEMA = [
    "CREATE TABLE IF NOT EXISTS naive_images (id bigserial PRIMARY KEY, task_id text NOT NULL, data bytea NOT NULL)",
    "CREATE TABLE IF NOT EXISTS naive_tasks (id uuid PRIMARY KEY, body jsonb NOT NULL, "
    "status text NOT NULL DEFAULT 'pending', created_at timestamptz NOT NULL DEFAULT now())",
]
