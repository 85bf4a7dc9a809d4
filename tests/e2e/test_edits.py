"""Image edits end to end: the real OpenAI SDK's images.edit against a real `imagegate api` and
`imagegate worker`, the fake upstream recording what it received."""

from __future__ import annotations

import base64
import io
import time

import openai
import pytest
from PIL import Image
from sqlalchemy import create_engine, text

from imagegate.app.queue import make_celery, publish_run
from tests.support.fake_upstream import Step
from tests.support.flows import wait_for_end

pytestmark = pytest.mark.e2e


def png(width: int = 8, height: int = 8, colour=(200, 30, 30, 255)) -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", (width, height), colour).save(out, format="PNG")
    return out.getvalue()


IMAGE, OTHER, MASK = png(), png(colour=(10, 200, 10, 255)), png(colour=(0, 0, 0, 0))


@pytest.fixture
def sdk(api_url, api_key, worker):
    return openai.OpenAI(base_url=f"{api_url}/v1", api_key=api_key, max_retries=0, timeout=60)


def decoded(data_uri: str) -> bytes:
    head, _, payload = data_uri.partition(",")
    assert head == "data:image/png;base64"
    return base64.b64decode(payload)


def test_sdk_edit_reaches_the_openai_upstream_with_its_image_and_mask(sdk, upstream, prompt):
    result = sdk.images.edit(
        model="fake-dalle",
        image=("cat.png", IMAGE, "image/png"),
        mask=("mask.png", MASK, "image/png"),
        prompt=prompt,
        n=2,
        size="1024x1024",
        response_format="b64_json",
    )
    assert len(result.data) == 2 and result.model_extra["task_status"] == "succeed"
    assert base64.b64decode(result.data[0].b64_json).startswith(b"\x89PNG")
    assert result.usage.total_tokens == 100
    (call,) = upstream.calls_for(prompt)
    assert call.kind == "edit"  # multipart to the upstream's /images/edits
    assert call.files == {"image": [("cat.png", "image/png", IMAGE)], "mask": [("mask.png", "image/png", MASK)]}
    assert call.body == {
        "prompt": prompt,
        "n": "2",
        "size": "1024x1024",
        "response_format": "b64_json",
        "model": "dall-e-3",
    }
    assert call.authorization.startswith("Bearer sk-upstream-secret-")


def test_sdk_edit_of_a_list_sends_the_upstream_every_image_in_order(sdk, upstream, prompt):
    sdk.images.edit(model="fake-dalle", image=[IMAGE, OTHER], prompt=prompt)
    (call,) = upstream.calls_for(prompt)
    assert [data for _, _, data in call.files["image[]"]] == [IMAGE, OTHER] and "mask" not in call.files


def test_sdk_edit_async_answers_a_task_that_ends_with_the_images(sdk, client, upstream, prompt):
    upstream.script(prompt, Step(delay_s=0.5))
    accepted = sdk.images.edit(
        model="fake-dalle",
        image=IMAGE,
        prompt=prompt,
        response_format="b64_json",
        extra_body={"async": True},
    )
    extra = accepted.model_extra
    assert extra["task_status"] == "pending" and accepted.data == []
    body = wait_for_end(client, extra["task_id"])
    assert body["task_status"] == "succeed" and len(body["data"]) == 1
    (call,) = upstream.calls_for(prompt)
    assert call.files["image"][0][2] == IMAGE


def test_an_edit_on_a_geekai_style_upstream_goes_in_the_image_and_mask_fields(sdk, upstream, prompt):
    upstream.script(prompt, Step(pending_polls=1))
    result = sdk.images.edit(model="fake-async", image=IMAGE, mask=MASK, prompt=prompt, n=2)
    assert len(result.data) == 2
    (submit,) = upstream.calls_for(prompt, "submit")
    assert submit.body["async"] is True and submit.files == {}
    assert decoded(submit.body["image"]) == IMAGE and decoded(submit.body["mask"]) == MASK


def test_a_local_edit_is_drawn_over_the_input_image(sdk):
    result = sdk.images.edit(model="local", image=png(40, 30), prompt="a hat", response_format="b64_json")
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.size == (40, 30)  # the input's size, no size asked


def test_a_retry_reads_the_input_files_again(client, sdk, upstream, prompt):
    upstream.script(prompt, Step(status=500))
    result = sdk.images.edit(model="fake-dalle", image=IMAGE, mask=MASK, prompt=prompt, extra_body={"retries": 1})
    assert result.model_extra["task_status"] == "succeed"
    calls = upstream.calls_for(prompt)
    assert len(calls) == 2
    assert all(call.files["image"][0][2] == IMAGE and call.files["mask"][0][2] == MASK for call in calls)


def test_an_attempt_taken_back_from_a_lost_worker_edits_with_the_stored_files(
    client, sdk, upstream, prompt, settings, database_url
):
    # The first call is slow; meanwhile its attempt is handed back as the sweeper does when a
    # worker dies (status pending, the next attempt published): the new attempt has only the database.
    upstream.script(prompt, Step(delay_s=3))
    task_id = sdk.images.edit(
        model="fake-dalle", image=IMAGE, mask=MASK, prompt=prompt, extra_body={"async": True}
    ).model_extra["task_id"]
    engine = create_engine(database_url)
    deadline = time.monotonic() + 20
    while not upstream.calls_for(prompt):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with engine.begin() as connection:
        attempts = connection.execute(
            text("UPDATE tasks SET status = 'pending' WHERE id = :id RETURNING attempts"), {"id": task_id}
        ).scalar_one()
    publish_run(make_celery(settings), task_id, attempts + 1)
    body = wait_for_end(client, task_id)
    assert body["task_status"] == "succeed" and body["attempts"] == 2
    calls = upstream.calls_for(prompt)
    assert len(calls) == 2 and all(call.files["image"][0][2] == IMAGE for call in calls)
    assert all(call.files["mask"][0][2] == MASK for call in calls)
    engine.dispose()


def test_sdk_sees_validation_errors_in_openai_shape(sdk):
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.images.edit(model="fake-dalle", image=("notes.txt", b"not an image", "text/plain"), prompt="x")
    error = raised.value.body
    assert raised.value.status_code == 400
    assert error["param"] == "image" and error["code"] == "invalid_image_format"
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.images.edit(model="fake-dalle", image=IMAGE, mask=png(16, 16, (0, 0, 0, 0)), prompt="x")
    assert raised.value.body["param"] == "mask"
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.images.edit(model="fake-dalle", image=IMAGE, prompt="x", n=11)
    assert raised.value.body["param"] == "n"
