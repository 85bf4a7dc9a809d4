"""Image edits without services: what a file is, which models edit, and how each adapter sends an
edit upstream (httpx.MockTransport)."""

from __future__ import annotations

import base64
import io
import json
from typing import ClassVar

import httpx
import pytest
from PIL import Image
from werkzeug.formparser import parse_form_data

from imagegate.app.edits import (
    ADAPTERS_THAT_EDIT,
    EditInputs,
    InputFile,
    can_edit,
    edit_refusal,
    sniff_image_type,
    split_stored,
)
from imagegate.app.failures import ErrorCode
from imagegate.app.providers import ModelConfig
from imagegate.app.schemas import EditRequest, generation_of
from imagegate.workers.adapters import checked, load_adapters
from imagegate.workers.adapters.base import Capabilities, UpstreamError
from imagegate.workers.adapters.chat_image import ChatImageAdapter
from imagegate.workers.adapters.geekai_async import GeekAIAsyncAdapter
from imagegate.workers.adapters.openai import OpenAIAdapter
from tests.unit.test_adapters import BASE_URL, KEY, PNG_B64, config, mock_client


def png(width: int = 4, height: int = 4, alpha: int = 255) -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", (width, height), (10, 20, 30, alpha)).save(out, format="PNG")
    return out.getvalue()


def image_file(index: int = 0, data: bytes | None = None) -> InputFile:
    return InputFile("image", index, "image/png", data or png(4 + index), f"in-{index}.png")


MASK = InputFile("mask", 0, "image/png", png(alpha=0), "mask.png")
IMAGES_REPLY = httpx.Response(200, json={"created": 1, "data": [{"b64_json": PNG_B64}]})


def multipart(sent: httpx.Request) -> tuple[dict, dict]:
    sent.read()
    _, form, files = parse_form_data(
        {
            "REQUEST_METHOD": "POST",
            "CONTENT_TYPE": sent.headers["content-type"],
            "CONTENT_LENGTH": str(len(sent.content)),
            "wsgi.input": io.BytesIO(sent.content),
        }
    )
    return form.to_dict(), {name: [(f.filename, f.read()) for f in files.getlist(name)] for name in files}


def edit_request(**fields):
    stored = EditRequest.model_validate({"prompt": "add a hat", **fields}).stored()
    return generation_of(stored)


# -- what a file is, which models edit -----------------------------------------------------------


def test_input_files_are_recognised_by_their_bytes_not_their_name():
    jpeg = io.BytesIO()
    Image.new("RGB", (2, 2)).save(jpeg, format="JPEG")
    webp = io.BytesIO()
    Image.new("RGB", (2, 2)).save(webp, format="WEBP")
    gif = io.BytesIO()
    Image.new("RGB", (2, 2)).save(gif, format="GIF")
    assert sniff_image_type(png()) == "image/png"
    assert sniff_image_type(jpeg.getvalue()) == "image/jpeg"
    assert sniff_image_type(webp.getvalue()) == "image/webp"
    assert sniff_image_type(gif.getvalue()) is None
    assert sniff_image_type(b"%PDF-1.7") is None and sniff_image_type(b"") is None


def test_the_api_knows_which_built_in_adapters_edit_as_they_declare_it():
    declared = {name for name, adapter in load_adapters().items() if adapter.capabilities.edits}
    assert declared == ADAPTERS_THAT_EDIT


def test_a_model_edits_by_its_providers_entry_then_its_family_then_its_adapter():
    assert can_edit(ModelConfig(name="m", adapter="openai", base_url=BASE_URL))
    assert not can_edit(ModelConfig(name="m", adapter="openai", base_url=BASE_URL, family="dall-e-3"))
    assert can_edit(ModelConfig(name="m", adapter="openai", base_url=BASE_URL, family="dall-e-3", edits=True))
    assert not can_edit(ModelConfig(name="m", adapter="openai", base_url=BASE_URL, edits=False))
    assert not can_edit(ModelConfig(name="m", adapter="some-plugin", base_url=BASE_URL))
    dalle2 = ModelConfig(name="m", adapter="openai", base_url=BASE_URL, family="dall-e-2")
    assert edit_refusal(dalle2, 1) is None
    param, message = edit_refusal(dalle2, 2)
    assert param == "image" and "at most 1" in message
    param, message = edit_refusal(ModelConfig(name="d3", adapter="openai", base_url=BASE_URL, family="dall-e-3"), 1)
    assert param == "model" and "'d3' does not support image edits" in message


def test_a_stored_edit_splits_into_its_fields_and_its_files():
    fields, edit = split_stored({"prompt": "p", "input_fidelity": "high", "edit": {"images": [{"bytes": 3}]}})
    assert fields == {"prompt": "p", "input_fidelity": "high"} and edit == {"images": [{"bytes": 3}]}
    assert split_stored({"prompt": "p"}) == ({"prompt": "p"}, None)
    assert generation_of(fields).prompt == "p"  # the edit-only field is left out, not refused


def test_an_adapter_declaring_edits_without_its_edit_method_is_refused_at_load():
    class NoEdit:
        name: ClassVar[str] = "no-edit"
        capabilities: ClassVar[Capabilities] = Capabilities(edits=True)

        def generate(self, request): ...

    with pytest.raises(TypeError, match="an adapter that edits needs edit"):
        checked("no-edit", NoEdit)

    class PollingNoEdit:
        capabilities: ClassVar[Capabilities] = Capabilities(polling=True, edits=True)

        def submit(self, request): ...

        def poll(self, upstream_task_id): ...

    with pytest.raises(TypeError, match="submit_edit"):
        checked("polling-no-edit", PollingNoEdit)


# -- adapters ------------------------------------------------------------------------------------


def test_openai_sends_one_image_and_the_mask_multipart_to_the_edits_endpoint():
    seen: list[httpx.Request] = []
    adapter = OpenAIAdapter(config("openai", upstream_model="gpt-image-1"), mock_client(IMAGES_REPLY, seen=seen), KEY)
    inputs = EditInputs((image_file(),), MASK, {"input_fidelity": "high"})
    generation = adapter.edit(edit_request(n=2, size="1024x1024", response_format="b64_json"), inputs)
    assert len(generation.images) == 1
    (sent,) = seen
    assert sent.method == "POST" and str(sent.url) == f"{BASE_URL}/images/edits"
    assert sent.headers["Authorization"] == f"Bearer {KEY}"
    form, files = multipart(sent)
    assert form == {
        "prompt": "add a hat",
        "n": "2",
        "size": "1024x1024",
        "response_format": "b64_json",
        "input_fidelity": "high",
        "model": "gpt-image-1",
    }
    assert files == {"image": [("in-0.png", inputs.images[0].data)], "mask": [("mask.png", MASK.data)]}


def test_openai_sends_several_images_as_image_brackets_in_order_and_no_gateway_fields():
    seen: list[httpx.Request] = []
    adapter = OpenAIAdapter(config("openai"), mock_client(IMAGES_REPLY, seen=seen), KEY)
    images = (image_file(0), image_file(1), image_file(2))
    adapter.edit(
        edit_request(**{"async": "true", "retries": "2", "callback_url": "https://x.example/h"}), EditInputs(images)
    )
    form, files = multipart(seen[0])
    assert files == {"image[]": [(image.filename, image.data) for image in images]}
    assert form == {"prompt": "add a hat", "model": "model-x"}  # async, retries, callback_url are the gateway's


def test_openai_edit_errors_are_read_like_generation_errors():
    reply = httpx.Response(400, json={"error": {"message": "mask size mismatch", "code": "invalid_mask"}})
    adapter = OpenAIAdapter(config("openai"), mock_client(reply), KEY)
    with pytest.raises(UpstreamError) as raised:
        adapter.edit(edit_request(), EditInputs((image_file(),), MASK))
    assert raised.value.code == ErrorCode.UPSTREAM_REJECTED and not raised.value.retryable


def test_openai_with_edit_mode_fields_sends_the_files_as_geekai_image_and_mask_fields():
    seen: list[httpx.Request] = []
    adapter = OpenAIAdapter(config("openai", edit_mode="fields"), mock_client(IMAGES_REPLY, seen=seen), KEY)
    image = image_file()
    adapter.edit(edit_request(), EditInputs((image,), MASK))
    (sent,) = seen
    assert str(sent.url) == f"{BASE_URL}/images/generations"
    body = json.loads(sent.content)
    assert body["image"] == "data:image/png;base64," + base64.b64encode(image.data).decode()
    assert body["mask"] == "data:image/png;base64," + base64.b64encode(MASK.data).decode()


def test_geekai_async_submits_an_edit_with_its_images_as_a_list_of_data_uris():
    seen: list[httpx.Request] = []
    reply = httpx.Response(200, json={"task_id": "up-1", "task_status": "pending", "data": []})
    adapter = GeekAIAsyncAdapter(config("geekai_async"), mock_client(reply, seen=seen), KEY)
    images = (image_file(0), image_file(1))
    assert adapter.submit_edit(edit_request(), EditInputs(images)) == "up-1"
    body = json.loads(seen[0].content)
    assert str(seen[0].url) == f"{BASE_URL}/images/generations" and body["async"] is True
    assert [base64.b64decode(uri.split(",", 1)[1]) for uri in body["image"]] == [image.data for image in images]
    assert "mask" not in body


def test_a_chat_model_edits_with_image_url_parts_and_refuses_a_mask():
    seen: list[httpx.Request] = []
    reply = httpx.Response(200, json={"choices": [{"message": {"content": f"![x](data:image/png;base64,{PNG_B64})"}}]})
    adapter = ChatImageAdapter(config("chat_image"), mock_client(reply, seen=seen), KEY)
    image = image_file()
    adapter.edit(edit_request(), EditInputs((image,)))
    content = json.loads(seen[0].content)["messages"][-1]["content"]
    assert content[1]["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(image.data).decode()
    with pytest.raises(UpstreamError) as raised:
        adapter.edit(edit_request(), EditInputs((image,), MASK))
    assert not raised.value.retryable and "mask" in raised.value.message
