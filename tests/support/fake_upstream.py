"""A real HTTP server on 127.0.0.1 that speaks the OpenAI Images wire format, scripted per prompt.

Tests key their script by a unique prompt, so they stay independent while sharing one server
and one worker. Every call is logged with its arrival time, and the calls in flight are counted per
upstream model (the body's `model`), with the most ever seen at once.
"""

from __future__ import annotations

import base64
import io
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

from werkzeug.formparser import parse_form_data

from tests.support.fake_http import JsonHandler, ScriptedServer, png_bytes


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
    # Asynchronous upstream: answer `pending` to this many polls, then end so.
    pending_polls: int = 0
    final_status: str = "succeed"
    # Answer every call with this step until this time.time() (then go on with the next step).
    until: float | None = None


@dataclass
class Call:
    prompt: str
    at: float
    body: dict
    authorization: str | None
    kind: str = "generate"  # or "submit" / "poll" for the asynchronous flow, "edit" for /images/edits
    key: str | None = None  # the Idempotency-Key: which call of which attempt of which task
    # A multipart edit's file parts: field name -> [(filename, content type, bytes)].
    files: dict[str, list[tuple[str, str, bytes]]] = field(default_factory=dict)


class FakeUpstream(ScriptedServer):
    default_step = Step

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._async_tasks: dict[str, dict] = {}
        self._in_flight: dict[str, int] = {}
        self._peak: dict[str, int] = {}
        super().__init__(host)

    def calls_per_key(self, prompts: set[str] | None = None) -> Counter:
        """Calls made with each Idempotency-Key (`imagegate-{task}-{attempt}-{slot}`): a count above 1
        is one attempt calling the upstream twice. Polls are left out (an attempt polls many times)."""
        with self._lock:
            return Counter(
                call.key for call in self.calls if call.kind != "poll" and (prompts is None or call.prompt in prompts)
            )

    def peak_in_flight(self, model: str) -> int:
        """The most calls of this upstream model this server was answering at once."""
        with self._lock:
            return self._peak.get(model, 0)

    def call_times(self, model: str, kind: str | None = None) -> list[float]:
        """When each call of this upstream model arrived (time.time()), in order."""
        with self._lock:
            return sorted(
                call.at for call in self.calls if call.body.get("model") == model and kind in (None, call.kind)
            )

    def _enter(self, model: str) -> None:
        with self._lock:
            self._in_flight[model] = self._in_flight.get(model, 0) + 1
            self._peak[model] = max(self._peak.get(model, 0), self._in_flight[model])

    def _leave(self, model: str) -> None:
        with self._lock:
            self._in_flight[model] -= 1

    def calls_for(self, prompt: str, kind: str | None = None) -> list[Call]:
        return [call for call in super().calls_for(prompt) if kind in (None, call.kind)]

    def finish_async(self, prompt: str) -> None:
        """Let the asynchronous upstream tasks of this prompt end at their next poll."""
        with self._lock:
            for task in self._async_tasks.values():
                if task["prompt"] == prompt:
                    task["step"].pending_polls = 0

    def images_reply(self, step: Step, n: int) -> dict:
        items = []
        for _ in range(n):
            item = (
                {"url": f"http://{self.host}:{self.port}/files/image.png"}
                if step.as_url
                else {"b64_json": base64.b64encode(png_bytes()).decode()}
            )
            if step.revised_prompt:
                item["revised_prompt"] = step.revised_prompt
            items.append(item)
        usage = step.usage or {
            "total_tokens": 100,
            "input_tokens": 10,
            "output_tokens": 90,
            "input_tokens_details": {"text_tokens": 10, "image_tokens": 0},
        }
        return {"created": int(time.time()), "data": items, "usage": usage}

    def handler_class(self):
        upstream = self

        class Handler(JsonHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/files/"):  # served images, for url replies
                    self.send(200, png_bytes(16, 16, (30, 200, 30)), "image/png")
                    return
                task_id = self.path.rsplit("/", 1)[-1]
                with upstream._lock:
                    task = upstream._async_tasks.get(task_id)
                    if task is not None:
                        step = task["step"]
                        step.pending_polls -= 1
                        done = step.pending_polls < 0
                if task is None:
                    self.send_error_json(404, "no such task")
                    return
                upstream.log(Call(task["prompt"], time.time(), {}, self.headers.get("Authorization"), "poll"))
                reply = {"task_id": task_id, "model": task["model"], "created": task["created"]}
                if not done:
                    reply |= {"task_status": "running", "data": []}
                elif step.final_status == "succeed":
                    reply |= upstream.images_reply(step, task["n"]) | {"task_status": "succeed"}
                else:
                    reply |= {
                        "task_status": "failed",
                        "data": [],
                        "error": {
                            "code": step.error_code or "generation_failed",
                            "message": step.message,
                            "details": {},
                        },
                    }
                self.send_json(200, reply)

            def do_POST(self) -> None:
                files: dict[str, list[tuple[str, str, bytes]]] = {}
                if self.path.rstrip("/").endswith("/images/edits"):
                    body, files = self.read_multipart()
                    kind = "edit"
                else:
                    body = self.read_json()
                    kind = "submit" if body.get("async") else "generate"
                model = str(body.get("model"))
                upstream._enter(model)
                try:
                    self._answer_post(body, kind, files)
                finally:
                    upstream._leave(model)

            def _answer_post(self, body: dict, kind: str, files: dict) -> None:
                prompt = body.get("prompt", "")
                upstream.log(
                    Call(
                        prompt,
                        time.time(),
                        body,
                        self.headers.get("Authorization"),
                        kind,
                        self.headers.get("Idempotency-Key"),
                        files,
                    )
                )
                step = upstream.next_step(prompt)
                if step.hang:
                    time.sleep(3600)
                    return
                time.sleep(step.delay_s)
                if step.status != 200:
                    self.send_error_json(step.status, step.message, step.error_code, step.headers)
                elif kind == "submit":
                    task_id = uuid.uuid4().hex
                    with upstream._lock:
                        upstream._async_tasks[task_id] = {
                            "prompt": prompt,
                            "step": step,
                            "n": int(body.get("n", 1)),
                            "model": body.get("model"),
                            "created": int(time.time()),
                        }
                    self.send_json(
                        200, {"created": int(time.time()), "task_id": task_id, "task_status": "pending", "data": []}
                    )
                elif step.trickle:
                    self._trickle(upstream.images_reply(step, int(body.get("n", 1))))
                else:
                    self.send_json(200, upstream.images_reply(step, int(body.get("n", 1))), step.headers)

            def read_multipart(self) -> tuple[dict, dict[str, list[tuple[str, str, bytes]]]]:
                """OpenAI's /images/edits body: (the text fields, the file parts)."""
                length = int(self.headers.get("Content-Length") or 0)
                environ = {
                    "REQUEST_METHOD": "POST",
                    "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                    "CONTENT_LENGTH": str(length),
                    "wsgi.input": io.BytesIO(self.rfile.read(length)),
                }
                _, form, parts = parse_form_data(environ)
                files = {
                    name: [(part.filename, part.content_type, part.read()) for part in parts.getlist(name)]
                    for name in parts
                }
                return form.to_dict(), files

            def _trickle(self, document: dict) -> None:
                body = json.dumps(document).encode()
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
