"""A succeeded b64_json task's reply (app/views.py): the body with the base64 spliced in is the
same JSON as the reply model written whole, whatever the prompts and the usage hold."""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime

import pybase64
import pytest

from imagegate.app.schemas import ImageData
from imagegate.app.views import b64_reply_body, images_reply, json_body

TRICKY = 'a "quoted" \\ prompt, "b64_json":"" and ünïcödé \n'


@pytest.mark.parametrize(
    ("images", "usage"),
    [
        ([], None),
        ([(os.urandom(3000), None)], {"total_tokens": 100}),
        ([(os.urandom(10), TRICKY), (b"", "second"), (os.urandom(7), None)], {"b64_json": "", "input": {"x": 1}}),
    ],
    ids=["no images", "one image with usage", "three images, prompts and usage that look like the data"],
)
def test_the_spliced_reply_is_the_reply_written_whole(images, usage):
    task_id, created_at = uuid.uuid4(), datetime(2026, 11, 30, 12, 0, 1, tzinfo=UTC)
    items = [ImageData(b64_json=pybase64.b64encode(data).decode(), revised_prompt=prompt) for data, prompt in images]
    whole = json_body(images_reply(task_id, created_at, usage, items))
    spliced = b64_reply_body(task_id, created_at, usage, images)
    assert json.loads(spliced) == json.loads(whole)
    assert [item.get("revised_prompt") for item in json.loads(spliced)["data"]] == [prompt for _, prompt in images]
