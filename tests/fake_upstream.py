"""A real HTTP server on 127.0.0.1 that speaks the OpenAI Images wire format, scripted per prompt.

Tests key their script by a unique prompt, so they stay independent while sharing one server
and one worker. Every call is logged with its arrival time.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


def png_bytes(width: int = 8, height: int = 8, colour=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, format="PNG")
    return out.getvalue()


@dataclass
class Step:
    """One scripted reply. status 200 answers images; `hang` never answers."""

    status: int = 200
    error_code: str | None = None
    message: str = "scripted failure"
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    hang: bool = False
    as_url: bool = False
    revised_prompt: str | None = None
    usage: dict | None = None
    # Send the reply one byte per second (an upstream that never quite finishes).
    trickle: bool = False
    # Asynchronous upstream (seed 000): answer `pending` to this many polls, then end so.
    pending_polls: int = 0
    final_status: str = "succeed"


@dataclass
class Call:
    prompt: str
    at: float
    body: dict
    authorization: str | None
    kind: str = "generate"  # or "submit" / "poll" for the asynchronous flow


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # hundreds of concurrent calls must not be refused at connect
    daemon_threads = True


class FakeUpstream:
    def __init__(self) -> None:
        self._scripts: dict[str, list[Step]] = {}
        self._async_tasks: dict[str, dict] = {}
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self.server = _Server(("127.0.0.1", 0), self._handler())
        self.port = self.server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "FakeUpstream":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()

    def script(self, prompt: str, *steps: Step) -> None:
        """Replies for successive calls with this prompt; after the last, plain success."""
        with self._lock:
            self._scripts[prompt] = list(steps)

    def calls_for(self, prompt: str, kind: str | None = None) -> list[Call]:
        with self._lock:
            return [call for call in self.calls if call.prompt == prompt and kind in (None, call.kind)]

    def finish_async(self, prompt: str) -> None:
        """Let the asynchronous upstream tasks of this prompt end at their next poll."""
        with self._lock:
            for task in self._async_tasks.values():
                if task["prompt"] == prompt:
                    task["step"].pending_polls = 0

    def images_reply(self, step: Step, n: int) -> dict:
        items = []
        for _ in range(n):
            item = ({"url": f"http://127.0.0.1:{self.port}/files/image.png"} if step.as_url
                    else {"b64_json": base64.b64encode(png_bytes()).decode()})
            if step.revised_prompt:
                item["revised_prompt"] = step.revised_prompt
            items.append(item)
        usage = step.usage or {"total_tokens": 100, "input_tokens": 10, "output_tokens": 90,
                               "input_tokens_details": {"text_tokens": 10, "image_tokens": 0}}
        return {"created": int(time.time()), "data": items, "usage": usage}

    def _next_step(self, prompt: str) -> Step:
        with self._lock:
            steps = self._scripts.get(prompt)
            return steps.pop(0) if steps else Step()

    def _handler(self):
        upstream = self

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
                if self.path.startswith("/files/"):  # served images, for url replies
                    self._send(200, png_bytes(16, 16, (30, 200, 30)), "image/png")
                    return
                task_id = self.path.rsplit("/", 1)[-1]
                with upstream._lock:
                    task = upstream._async_tasks.get(task_id)
                    if task is None:
                        self._send(404, b'{"error": {"message": "no such task"}}', "application/json")
                        return
                    upstream.calls.append(Call(task["prompt"], time.time(), {}, self.headers.get("Authorization"),
                                               "poll"))
                    step = task["step"]
                    step.pending_polls -= 1
                    done = step.pending_polls < 0
                reply = {"task_id": task_id, "model": task["model"], "created": task["created"]}
                if not done:
                    reply |= {"task_status": "running", "data": []}
                elif step.final_status == "succeed":
                    reply |= upstream.images_reply(step, task["n"]) | {"task_status": "succeed"}
                else:
                    reply |= {"task_status": "failed", "data": [],
                              "error": {"code": step.error_code or "generation_failed", "message": step.message,
                                        "details": {}}}
                self._send(200, json.dumps(reply).encode(), "application/json")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                prompt = body.get("prompt", "")
                kind = "submit" if body.get("async") else "generate"
                with upstream._lock:
                    upstream.calls.append(Call(prompt, time.time(), body, self.headers.get("Authorization"), kind))
                step = upstream._next_step(prompt)
                if step.hang:
                    time.sleep(3600)
                    return
                time.sleep(step.delay_s)
                if step.status != 200:
                    error = {"error": {"message": step.message, "type": "invalid_request_error",
                                       "param": None, "code": step.error_code}}
                    self._send(step.status, json.dumps(error).encode(), "application/json", step.headers)
                    return
                if kind == "submit":
                    task_id = uuid.uuid4().hex
                    with upstream._lock:
                        upstream._async_tasks[task_id] = {"prompt": prompt, "step": step, "n": int(body.get("n", 1)),
                                                          "model": body.get("model"), "created": int(time.time())}
                    reply = {"created": int(time.time()), "task_id": task_id, "task_status": "pending", "data": []}
                    self._send(200, json.dumps(reply).encode(), "application/json")
                    return
                reply = json.dumps(upstream.images_reply(step, int(body.get("n", 1)))).encode()
                if step.trickle:
                    self._trickle(reply)
                    return
                self._send(200, reply, "application/json", step.headers)

            def _trickle(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    for byte in body:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(1)
                except OSError:  # the client gave up, as it should
                    pass

        return Handler
