"""One signed webhook delivery attempt (Standard Webhooks, https://www.standardwebhooks.com/) to a
client-chosen URL, through a client of workers.outbound: it connects only to addresses it checked.
Signing and secrets are in app.webhook_signing, the retry schedule in app.settings.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass

import httpx

from imagegate.app.ssrf import UnsafeUrl
from imagegate.app.webhook_signing import signature_header

USER_AGENT = "imagegate-webhooks"


@dataclass(frozen=True)
class DeliveryResult:
    status: int | None  # the receiver's HTTP status, None when there was no answer
    latency_ms: int
    error: str | None  # None on success (a 2xx)
    disable: bool  # the receiver answered 410 Gone: stop sending to this endpoint
    reply: bytes = b""  # the start of the reply body (at most max_reply_bytes), for delivery logs

    @property
    def ok(self) -> bool:
        return self.error is None


class _Watchdog:
    """Shuts the connection down at the deadline. httpx timeouts apply to each read, so a receiver
    trickling its status line or headers a byte at a time would otherwise hold the worker forever;
    shutdown() (unlike close()) wakes a recv blocked in another thread or greenlet."""

    def __init__(self, seconds: float):
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._fired = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def trace(self, event: str, info: dict) -> None:  # httpx/httpcore "trace" request extension
        if event == "connection.connect_tcp.complete":
            # A duplicate of the descriptor: it survives the TLS wrapper taking over the original.
            with self._lock:
                self._sock = info["return_value"].get_extra_info("socket").dup()
                if self._fired:
                    self._shutdown()

    @property
    def fired(self) -> bool:
        return self._fired

    def _fire(self) -> None:
        with self._lock:
            self._fired = True
            self._shutdown()

    def _shutdown(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self._timer.cancel()
        with self._lock:
            if self._sock is not None:
                self._sock.close()
            self._sock = None


def deliver(
    client: httpx.Client,
    url: str,
    body: bytes,
    headers: dict,
    *,
    secrets: list[str],
    msg_id: str,
    timestamp: int,
    deadline_s: float = 15.0,
    max_reply_bytes: int = 64 * 1024,
) -> DeliveryResult:
    """POST one signed webhook with a client of workers.outbound (its policy says which addresses
    may be reached); never raises for anything the receiver or the network does.

    Success is a 2xx, decided on the status line: redirects are not followed (a 3xx is a failure),
    and the reply body is read only up to max_reply_bytes and until the deadline, then dropped.
    The whole attempt (name lookup, connect, TLS, sending, headers, body) ends within about deadline_s.
    """
    started = time.monotonic()
    deadline = started + deadline_s

    def elapsed_ms() -> int:
        return int((time.monotonic() - started) * 1000)

    sent_headers = httpx.Headers(headers)
    sent_headers.update(
        {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "accept-encoding": "identity",  # the reply is kept raw: no decompression (bombs) to cap
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature_header(secrets, msg_id, timestamp, body),
            # A fresh connection for every delivery: opening one is what arms the watchdog.
            "connection": "close",
        }
    )
    watchdog = _Watchdog(deadline_s)
    try:
        request = client.build_request(
            "POST",
            url,
            content=body,
            headers=sent_headers,
            timeout=httpx.Timeout(deadline_s),
            extensions={"trace": watchdog.trace},
        )
        response = client.send(request, stream=True, follow_redirects=False)
    except (UnsafeUrl, httpx.InvalidURL, httpx.TransportError, OSError) as exc:
        watchdog.stop()
        return DeliveryResult(None, elapsed_ms(), _not_sent(exc, watchdog.fired, deadline_s), False)
    try:
        reply = _read_capped(response, max_reply_bytes, deadline)
    finally:
        response.close()
        watchdog.stop()
    status = response.status_code
    if 200 <= status < 300:
        return DeliveryResult(status, elapsed_ms(), None, False, reply)
    if 300 <= status < 400:
        problem = f"answered {status} (redirects are not followed)"
    elif status == 410:
        problem = "answered 410 Gone: the endpoint asks to stop deliveries"
    else:
        problem = f"answered {status}"
    return DeliveryResult(status, elapsed_ms(), problem, status == 410, reply)


def _not_sent(exc: Exception, timed_out: bool, deadline_s: float) -> str:
    """Why no answer came, for the delivery log."""
    if isinstance(exc, UnsafeUrl):
        return f"refused: {exc}"
    if isinstance(exc, (httpx.InvalidURL, httpx.UnsupportedProtocol)):
        return f"refused: not a valid URL: {exc}"
    if timed_out or isinstance(exc, httpx.TimeoutException):
        return f"no reply within {deadline_s:g} s"
    return f"connection failed: {exc or type(exc).__name__}"


def _read_capped(response: httpx.Response, max_bytes: int, deadline: float) -> bytes:
    """Up to max_bytes of the body, stopping early at the deadline or on a broken connection."""
    chunks, size = [], 0
    try:
        for chunk in response.iter_raw():
            chunks.append(chunk[: max_bytes - size])
            size += len(chunks[-1])
            if size >= max_bytes or time.monotonic() >= deadline:
                break
    except (httpx.TransportError, httpx.DecodingError):
        pass  # the status already decided the outcome; the body is only for the logs
    return b"".join(chunks)
