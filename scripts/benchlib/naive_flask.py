"""Naive baseline (b): a plain Flask intake. POST inserts a row and publishes a Celery message.
Served by `gunicorn -k gthread --threads 8 benchlib.naive_flask:app`.

Environment: NAIVE_BROKER_URL, NAIVE_DATABASE_URL."""

from __future__ import annotations

import json
import os
import uuid

import sqlalchemy as sa
from flask import Flask, jsonify, request

from benchlib.naive_celery import celery

app = Flask(__name__)
engine = sa.create_engine(os.environ["NAIVE_DATABASE_URL"], pool_size=8, max_overflow=8)


@app.post("/v1/images/generations")
def submit():
    body = request.get_json(force=True)
    if not isinstance(body, dict) or not body.get("prompt"):
        return jsonify(
            {
                "error": {
                    "message": "prompt is required",
                    "type": "invalid_request_error",
                    "param": "prompt",
                    "code": None,
                }
            }
        ), 400
    task_id = uuid.uuid4()
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO naive_tasks (id, body) VALUES (:id, CAST(:body AS jsonb))"),
            {"id": task_id, "body": json.dumps(body)},
        )
    celery.send_task("naive.generate", args=[str(task_id), body["prompt"]])
    return jsonify({"task_id": str(task_id), "task_status": "pending", "data": []}), 202
