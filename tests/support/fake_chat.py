"""A real HTTP server on 127.0.0.1 that draws through chat completions, scripted per prompt.

The prompt is the text of the last user message, so tests key their script by a unique prompt and
stay independent while sharing one server. Reply styles are the places relays put the image:

- "geekai": the seed's shape, markdown `![](URL)` in `content` and the same URL in `message.image.url`;
  the URL is this server's own `GET /files/cat.png`;
- "openrouter": `message.images[]` holding a data: URI PNG;
- "markdown_data": a bare `data:image/png;base64,...` URI in the text `content`, nothing else;
- "no_image": words only (the seed's "Gemini 不出图").
"""

from __future__ import annotations

import base64
import time
import uuid
from dataclasses import dataclass

from tests.support.fake_http import JsonHandler, ScriptedServer, png_bytes

STYLES = ("geekai", "openrouter", "markdown_data", "no_image")


@dataclass
class ChatStep:
    """One scripted reply: an image in `style`, or an error when status is not 200."""

    style: str = "geekai"
    status: int = 200
    error_code: str | None = None
    message: str = "scripted failure"
    retry_after: str | None = None  # sent as the Retry-After header of an error reply
    delay_s: float = 0.0

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"unknown style {self.style!r}; one of {STYLES}")


@dataclass
class ChatCall:
    prompt: str
    at: float
    body: dict
    authorization: str | None


def last_user_text(body: dict) -> str:
    """The prompt: the text of the last user message, plain or in content parts."""
    users = [m for m in body.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
    content = users[-1].get("content") if users else ""
    if isinstance(content, list):
        return "".join(
            part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return content if isinstance(content, str) else ""


class FakeChat(ScriptedServer):
    default_step = ChatStep

    def __init__(self) -> None:
        self.downloads: list[str] = []  # paths of GET /files/... hits
        super().__init__()
        self.image_url = f"http://127.0.0.1:{self.port}/files/cat.png"

    def reply(self, step: ChatStep, model: str) -> dict:
        data_uri = "data:image/png;base64," + base64.b64encode(png_bytes(8, 8, (200, 30, 30))).decode()
        if step.style == "geekai":
            message = {
                "role": "assistant",
                "content": f"好的,这是一只在草丛中玩耍的可爱小猫: \n![]({self.image_url})\n",
                "image": {"url": self.image_url},
            }
        elif step.style == "openrouter":
            message = {
                "role": "assistant",
                "content": "Here is your image.",
                "images": [{"type": "image_url", "image_url": {"url": data_uri}}],
            }
        elif step.style == "markdown_data":
            message = {"role": "assistant", "content": f"Here it is:\n{data_uri}\n"}
        else:
            message = {"role": "assistant", "content": "我无法生成图片,但可以为你描述一只小猫。"}
        return {
            "id": str(uuid.uuid4()),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 1290, "total_tokens": 1302},
        }

    def handler_class(self):
        fake = self

        class Handler(JsonHandler):
            def do_GET(self) -> None:
                if not self.path.startswith("/files/"):
                    self.send_error_json(404, "not found")
                    return
                with fake._lock:
                    fake.downloads.append(self.path)
                self.send(200, png_bytes(16, 16, (30, 200, 30)), "image/png")

            def do_POST(self) -> None:
                body = self.read_json()
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self.send_error_json(404, "not found")
                    return
                prompt = last_user_text(body)
                fake.log(ChatCall(prompt, time.time(), body, self.headers.get("Authorization")))
                step = fake.next_step(prompt)
                time.sleep(step.delay_s)
                if step.status != 200:
                    headers = {"Retry-After": step.retry_after} if step.retry_after else {}
                    self.send_error_json(step.status, step.message, step.error_code, headers)
                    return
                self.send_json(200, fake.reply(step, str(body.get("model", ""))))

        return Handler
