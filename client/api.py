"""The imagegate API as `imagegate batch` uses it: batches, their results, signed image files."""

from __future__ import annotations

import json

import httpx

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


class ClientError(Exception):
    """Said in one line on stderr, then exit 2."""


class HttpError(ClientError):
    def __init__(self, response: httpx.Response):
        self.status = response.status_code
        try:
            self.error = response.json()["error"]
            detail = f"{self.error.get('code') or self.error.get('type')}: {self.error.get('message')}"
        except (ValueError, KeyError, TypeError):
            self.error = {}
            detail = " ".join(response.text.split())[:200] or response.reason_phrase
        super().__init__(
            f"{response.request.method} {response.request.url} answered HTTP {response.status_code}: {detail}"
        )


class Api:
    def __init__(self, url: str, key: str):
        self.url = url.rstrip("/")
        timeout = httpx.Timeout(60, connect=10)
        self.http = httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=timeout)
        # Image URLs are signed: the API key is not sent there, wherever they point.
        self.files = httpx.Client(timeout=timeout, follow_redirects=True)

    def _send(self, client: httpx.Client, method: str, url: str, **kwargs) -> httpx.Response:
        response = client.request(method, url, **kwargs)  # transport errors: see _command
        if response.is_error:
            raise HttpError(response)
        return response

    def submit(self, body: bytes, idempotency_key: str) -> dict:
        return self._send(
            self.http,
            "POST",
            f"{self.url}/v1/images/batches",
            content=body,
            headers={"Content-Type": "application/jsonl", "Idempotency-Key": idempotency_key},
        ).json()

    def batch(self, batch_id: str) -> dict:
        return self._send(self.http, "GET", f"{self.url}/v1/images/batches/{batch_id}").json()

    def results(self, batch_id: str) -> list[dict]:
        text = self._send(self.http, "GET", f"{self.url}/v1/images/batches/{batch_id}/results").text
        return [json.loads(line) for line in text.split("\n") if line.strip()]

    def stream_results(self, batch_id: str, out) -> None:
        with self.http.stream("GET", f"{self.url}/v1/images/batches/{batch_id}/results") as response:
            if response.is_error:
                response.read()
                raise HttpError(response)
            for chunk in response.iter_bytes():
                out.write(chunk)

    def download(self, url: str) -> tuple[bytes, str]:
        response = self._send(self.files, "GET", url)
        content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        return response.content, EXTENSIONS.get(content_type, "bin")
