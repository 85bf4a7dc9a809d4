"""What the fake upstreams share: a threaded HTTP server on 127.0.0.1, replies scripted per
prompt (tests use unique prompts, so they stay independent on one shared server), a call log."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image


def png_bytes(width: int = 8, height: int = 8, colour=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, format="PNG")
    return out.getvalue()


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # hundreds of concurrent calls must not be refused at connect
    daemon_threads = True


class JsonHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the caller gave up (a deadline, a killed worker): nothing to answer

    def send(
        self, status: int, body: bytes, content_type: str = "application/json", headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, status: int, document: Any, headers: dict[str, str] | None = None) -> None:
        self.send(status, json.dumps(document, ensure_ascii=False).encode(), headers=headers)

    def send_error_json(
        self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        self.send_json(
            status,
            {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}},
            headers,
        )

    def read_json(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")


class ScriptedServer:
    """Subclasses give `handler_class(fake)` and the default step; tests call script()/calls_for()."""

    default_step: Callable[[], Any]

    def __init__(self, host: str = "127.0.0.1") -> None:
        """host: the address to listen on (scripts/cluster's hosts reach it on a bridge's address)."""
        self._scripts: dict[str, list] = {}
        self.calls: list = []
        self._lock = threading.Lock()
        self.host = host
        self.server = _Server((host, 0), self.handler_class())
        self.port = self.server.server_address[1]
        self.base_url = f"http://{host}:{self.port}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def handler_class(self) -> type[JsonHandler]:
        raise NotImplementedError

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def script(self, prompt: str, *steps) -> None:
        """Replies for successive calls with this prompt; after the last, the default step."""
        with self._lock:
            self._scripts[prompt] = list(steps)

    def calls_for(self, prompt: str) -> list:
        with self._lock:
            return [call for call in self.calls if call.prompt == prompt]

    def log(self, call) -> None:
        with self._lock:
            self.calls.append(call)

    def next_step(self, prompt: str):
        """The prompt's next scripted step; a step with `until` (a time.time()) answers every call
        until then."""
        with self._lock:
            steps = self._scripts.get(prompt)
            if not steps:
                return self.default_step()
            if getattr(steps[0], "until", None) and time.time() < steps[0].until:
                return steps[0]
            return steps.pop(0)
