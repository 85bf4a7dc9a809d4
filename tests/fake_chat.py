"""A real HTTP server on 127.0.0.1 that draws through chat completions (seed 002), scripted per prompt.

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
import io
import json
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

STYLES = ("geekai", "openrouter", "markdown_data", "no_image")


def png_bytes(width: int = 8, height: int = 8, colour=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, format="PNG")
    return out.getvalue()


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


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # hundreds of concurrent calls must not be refused at connect
    daemon_threads = True


def last_user_text(body: dict) -> str:
    """The prompt: the text of the last user message, plain or in content parts."""
    users = [m for m in body.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
    content = users[-1].get("content") if users else ""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content
                       if isinstance(part, dict) and part.get("type") == "text")
    return content if isinstance(content, str) else ""


class FakeChat:
    def __init__(self) -> None:
        self._scripts: dict[str, list[ChatStep]] = {}
        self.calls: list[ChatCall] = []
        self.downloads: list[str] = []  # paths of GET /files/... hits
        self._lock = threading.Lock()
        self.server = _Server(("127.0.0.1", 0), self._handler())
        self.port = self.server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.image_url = f"http://127.0.0.1:{self.port}/files/cat.png"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "FakeChat":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def script(self, prompt: str, *steps: ChatStep) -> None:
        """Replies for successive calls with this prompt; after the last, a "geekai" image."""
        with self._lock:
            self._scripts[prompt] = list(steps)

    def calls_for(self, prompt: str) -> list[ChatCall]:
        with self._lock:
            return [call for call in self.calls if call.prompt == prompt]

    def _next_step(self, prompt: str) -> ChatStep:
        with self._lock:
            steps = self._scripts.get(prompt)
            return steps.pop(0) if steps else ChatStep()

    def reply(self, step: ChatStep, model: str) -> dict:
        data_uri = "data:image/png;base64," + base64.b64encode(png_bytes(8, 8, (200, 30, 30))).decode()
        if step.style == "geekai":
            message = {"role": "assistant",
                       "content": f"好的,这是一只在草丛中玩耍的可爱小猫: \n![]({self.image_url})\n",
                       "image": {"url": self.image_url}}
        elif step.style == "openrouter":
            message = {"role": "assistant", "content": "Here is your image.",
                       "images": [{"type": "image_url", "image_url": {"url": data_uri}}]}
        elif step.style == "markdown_data":
            message = {"role": "assistant", "content": f"Here it is:\n{data_uri}\n"}
        else:
            message = {"role": "assistant", "content": "我无法生成图片,但可以为你描述一只小猫。"}
        return {"id": str(uuid.uuid4()), "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 12, "completion_tokens": 1290, "total_tokens": 1302}}

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path.startswith("/files/"):
                    with fake._lock:
                        fake.downloads.append(self.path)
                    self._send(200, png_bytes(16, 16, (30, 200, 30)), "image/png")
                else:
                    self._send(404, b'{"error": {"message": "not found"}}', "application/json")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, b'{"error": {"message": "not found"}}', "application/json")
                    return
                body = json.loads(raw or b"{}")
                prompt = last_user_text(body)
                with fake._lock:
                    fake.calls.append(ChatCall(prompt, time.time(), body, self.headers.get("Authorization")))
                step = fake._next_step(prompt)
                time.sleep(step.delay_s)
                if step.status != 200:
                    error = {"error": {"message": step.message, "type": "invalid_request_error",
                                       "param": None, "code": step.error_code}}
                    headers = {"Retry-After": step.retry_after} if step.retry_after else {}
                    self._send(step.status, json.dumps(error).encode(), "application/json", headers)
                    return
                reply = fake.reply(step, str(body.get("model", "")))
                self._send(200, json.dumps(reply, ensure_ascii=False).encode(), "application/json")

        return Handler
