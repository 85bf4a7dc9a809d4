"""A webhook receiver (on 127.0.0.1 unless told otherwise): answers each path's scripted statuses
(then 200) and keeps every delivery (path, time, headers, body)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from tests.support.fake_http import JsonHandler, ScriptedServer


@dataclass
class Hit:
    prompt: str  # the path, which scripts the receiver
    at: float
    headers: dict
    body: bytes


@dataclass
class Reply:
    status: int = 200


class Receiver(ScriptedServer):
    default_step = Reply

    def handler_class(self):
        receiver = self

        class Handler(JsonHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.log(Hit(self.path, time.time(), dict(self.headers), body))
                self.send(receiver.next_step(self.path).status, b"ok", "text/plain")

        return Handler

    def url(self, *statuses: int) -> str:
        """A URL of its own, answering `statuses` in turn and then 200."""
        path = f"/hook/{uuid.uuid4().hex}"
        self.script(path, *[Reply(status) for status in statuses])
        return f"http://{self.host}:{self.port}{path}"

    def hits(self, url: str) -> list[Hit]:
        return self.calls_for(url.split(str(self.port), 1)[1])
