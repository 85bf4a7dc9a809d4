"""The clients: synchronous and asynchronous requests and one batch, all through the balancer, as
an application would send them. Every POST carries an Idempotency-Key and is sent again, with the
same key, when the connection fails or the balancer answers 502/503/504 (an API host lost): the
gateway answers a repeated key with the task it already accepted."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field

import httpx

RETRYABLE = (502, 503, 504)


@dataclass(frozen=True)
class Mix:
    sync: int = 100  # synchronous requests, sent by `sync_clients` clients one after another
    sync_clients: int = 10
    asynchronous: int = 200  # async requests, each with a callback_url (a webhook when it ends)
    async_clients: int = 4
    batch_lines: int = 2000  # one batch, with a callback_url of its own
    limited: int = 100  # async requests, 2 clients, for the model with per-model upstream limits

    @property
    def tasks(self) -> int:
        return self.sync + self.asynchronous + self.batch_lines + self.limited


@dataclass
class Request:
    kind: str  # sync | async | batch | limited
    prompt: str  # or the batch's label
    idempotency_key: str = field(default_factory=lambda: f"cluster-{uuid.uuid4()}")
    task_id: str | None = None  # or the batch id
    status: int | None = None  # the last HTTP status
    outcome: str | None = None  # succeed / failed as the client saw it (sync), or accepted
    sends: int = 0
    interrupted: int = 0  # sends cut by a lost connection or answered 502/503/504
    replayed: bool = False  # an answer with Idempotent-Replayed: true
    served_by: str | None = None  # the API host that answered, per the balancer
    waiting_at_loss: bool = False  # in flight when an API host was lost
    found_by_id: str | None = None  # then, if it was on that host: its task's status, read by id after the answer
    error: str | None = None
    in_flight: bool = False

    @property
    def on_lost_host(self) -> bool:
        """Waiting when an API host was lost, and on that host: the client saw its connection cut
        (and sent it again), or the balancer sent it again itself (the answer says replayed)."""
        return self.waiting_at_loss and bool(self.interrupted or self.replayed)


class Workload:
    def __init__(self, base_url: str, key: str, models: tuple[str, str], run: str, mix: Mix, receiver_url: str) -> None:
        """models: the plain model, and the one with per-model limits."""
        self.base_url, self.key, self.run, self.mix = base_url, key, run, mix
        self.model, self.limited_model = models
        self.callback_path = f"/hook/{run}"  # the receiver keeps each path's deliveries apart
        self.callback_url = receiver_url + self.callback_path
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.started = 0.0

    # -- running it ---------------------------------------------------------------------------
    def start(self) -> None:
        self.started = time.monotonic()
        self._spawn(self._batch)
        per_async = _split(self.mix.asynchronous, self.mix.async_clients)
        for client, count in enumerate(per_async):
            self._spawn(self._asyncs, client, count)
        for client, count in enumerate(_split(self.mix.sync, self.mix.sync_clients)):
            self._spawn(self._syncs, client, count)
        for client, count in enumerate(_split(self.mix.limited, 2)):
            self._spawn(self._limited, client, count)

    def join(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def in_flight(self, kind: str) -> int:
        with self._lock:
            return sum(request.in_flight for request in self.requests if request.kind == kind)

    def mark_waiting(self, kind: str) -> int:
        """Mark the requests of this kind in flight now (an API host is about to be lost)."""
        with self._lock:
            waiting = [request for request in self.requests if request.kind == kind and request.in_flight]
            for request in waiting:
                request.waiting_at_loss = True
            return len(waiting)

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url, headers={"Authorization": f"Bearer {self.key}"}, timeout=httpx.Timeout(180)
        )

    def _new(self, kind: str, label: str) -> Request:
        request = Request(kind, f"{self.run} {label} {uuid.uuid4().hex[:8]}")
        with self._lock:
            self.requests.append(request)
        return request

    def _body(self, prompt: str, **extra) -> dict:
        return {"model": self.model, "prompt": prompt, "response_format": "b64_json"} | extra

    def _post(self, http: httpx.Client, request: Request, path: str, body: dict) -> httpx.Response | None:
        """POST until answered by an API host (the same Idempotency-Key each time); None after 5 min."""
        deadline = time.monotonic() + 300
        request.in_flight = True
        try:
            while time.monotonic() < deadline:
                request.sends += 1
                try:
                    response = http.post(path, json=body, headers={"Idempotency-Key": request.idempotency_key})
                except httpx.TransportError as exc:
                    request.interrupted += 1
                    request.error = f"{type(exc).__name__}: {exc}"
                    time.sleep(0.5)
                    continue
                request.status = response.status_code
                if response.status_code in RETRYABLE:
                    request.interrupted += 1
                    time.sleep(0.5)
                    continue
                request.replayed = response.headers.get("Idempotent-Replayed") == "true"
                request.served_by = response.headers.get("X-Served-By")
                request.error = None if response.status_code < 400 else response.text[:300]
                return response
            return None
        finally:
            request.in_flight = False

    def _batch(self) -> None:
        request = self._new("batch", "batch")
        lines = [
            {"custom_id": f"line-{index}", "body": self._body(f"{request.prompt} line {index}")}
            for index in range(self.mix.batch_lines)
        ]
        if not lines:
            return
        with self._client() as http:
            response = self._post(
                http, request, "/v1/images/batches", {"requests": lines, "callback_url": self.callback_url}
            )
            if response is not None and response.status_code == 202:
                request.task_id, request.outcome = response.json()["id"], "accepted"

    def _asyncs(self, client: int, count: int) -> None:
        with self._client() as http:
            for index in range(count):
                request = self._new("async", f"async {client}-{index}")
                response = self._post(
                    http,
                    request,
                    "/v1/images/generations",
                    self._body(request.prompt, **{"async": True, "callback_url": self.callback_url}),
                )
                if response is not None and response.status_code == 202:
                    request.task_id, request.outcome = response.json()["task_id"], "accepted"

    def _limited(self, client: int, count: int) -> None:
        with self._client() as http:
            for index in range(count):
                request = self._new("limited", f"limited {client}-{index}")
                body = self._body(request.prompt, model=self.limited_model, **{"async": True})
                response = self._post(http, request, "/v1/images/generations", body)
                if response is not None and response.status_code == 202:
                    request.task_id, request.outcome = response.json()["task_id"], "accepted"

    def _syncs(self, client: int, count: int) -> None:
        with self._client() as http:
            for index in range(count):
                request = self._new("sync", f"sync {client}-{index}")
                response = self._post(http, request, "/v1/images/generations", self._body(request.prompt))
                if response is None:
                    continue
                document = response.json()
                request.task_id = document.get("task_id")
                if response.status_code == 200 and document.get("data") and document["data"][0].get("b64_json"):
                    request.outcome = "succeed"
                elif response.status_code == 202 and request.task_id:  # waited past the sync timeout
                    request.outcome = self._wait_by_id(http, request.task_id)
                else:
                    request.outcome = "failed"
                if request.on_lost_host and request.task_id:
                    request.found_by_id = self._wait_by_id(http, request.task_id)

    def _wait_by_id(self, http: httpx.Client, task_id: str) -> str:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                response = http.get(f"/v1/images/{task_id}")
                if response.status_code == 200 and response.json()["task_status"] in ("succeed", "failed"):
                    return response.json()["task_status"]
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        return "not ended"

    # -- what the clients saw -----------------------------------------------------------------
    def prompts(self) -> set[str]:
        """Every prompt sent (a batch's lines included), to pick this run's calls at the upstream."""
        found = set()
        for request in self.requests:
            if request.kind == "batch":
                found |= {f"{request.prompt} line {index}" for index in range(self.mix.batch_lines)}
            else:
                found.add(request.prompt)
        return found


def _split(total: int, parts: int) -> list[int]:
    parts = max(1, min(parts, total)) if total else 0
    return [total // parts + (index < total % parts) for index in range(parts)]
