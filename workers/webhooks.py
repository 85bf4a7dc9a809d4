"""Signed webhook delivery (Standard Webhooks, https://www.standardwebhooks.com/): signing, secrets,
one delivery attempt to a client-chosen URL, and the retry schedule.

A delivery resolves the URL once, checks every address (app.ssrf) and connects to the checked
address itself, so a DNS answer that changes between check and connect (DNS rebinding) cannot
steer the request into our network.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import math
import secrets as _secrets
import socket
import threading
import time
from dataclasses import dataclass

import httpx

from app.ssrf import UnsafeUrl, resolve_public

SECRET_PREFIX = "whsec_"
USER_AGENT = "imagegate-webhooks"
DEFAULT_RETRY_SCHEDULE = [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 86400.0]


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(24)).decode("ascii")


def _key(secret: str) -> bytes:
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a webhook secret is 'whsec_' followed by base64") from None
    if not key:
        raise ValueError("a webhook secret may not be empty")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,<base64 HMAC-SHA256>` signature of `{msg_id}.{timestamp}.{body}`."""
    digest = hmac.new(_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def signature_header(secrets: list[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature value: one signature per secret, so that while a secret is rotated
    receivers holding either the old or the new one can verify."""
    if not secrets:
        raise ValueError("at least one webhook secret is needed to sign")
    return " ".join(sign(secret, msg_id, timestamp, body) for secret in secrets)


def retry_schedule(text: str | None) -> list[float]:
    """Delays in seconds before each retry, from "5,300,1800"; None or blank gives the default."""
    if text is None or not text.strip():
        return list(DEFAULT_RETRY_SCHEDULE)
    delays = []
    for item in text.split(","):
        try:
            delay = float(item)
        except ValueError:
            delay = math.nan
        if not math.isfinite(delay) or delay < 0:
            raise ValueError(f"invalid webhook retry schedule {text!r}: expected comma-separated "
                             f"non-negative numbers of seconds such as '5,300,1800', got {item.strip()!r}")
        delays.append(delay)
    return delays


@dataclass(frozen=True)
class DeliveryResult:
    status: int | None   # the receiver's HTTP status, None when there was no answer
    latency_ms: int
    error: str | None    # None on success (a 2xx)
    disable: bool        # the receiver answered 410 Gone: stop sending to this endpoint
    reply: bytes = b""   # the start of the reply body (at most max_reply_bytes), for delivery logs

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


def _host_header(hostname: str, port: int | None) -> str:
    host = f"[{hostname}]" if ":" in hostname else hostname
    return host if port is None else f"{host}:{port}"


def deliver(url: str, body: bytes, headers: dict, *, secrets: list[str], msg_id: str, timestamp: int,
            allow_private: bool, deadline_s: float = 15.0, max_reply_bytes: int = 64 * 1024,
            client: httpx.Client | None = None) -> DeliveryResult:
    """POST one signed webhook; never raises for anything the receiver or the network does.

    Success is a 2xx, decided on the status line: redirects are not followed (a 3xx is a failure),
    and the reply body is read only up to max_reply_bytes and until the deadline, then dropped.
    The whole attempt (connect, TLS, sending, headers, body) ends within about deadline_s.
    """
    started = time.monotonic()
    deadline = started + deadline_s

    def elapsed_ms() -> int:
        return int((time.monotonic() - started) * 1000)

    try:
        hostname, addresses = resolve_public(url, allow_private=allow_private)
        target = httpx.URL(url)
    except UnsafeUrl as exc:
        return DeliveryResult(None, 0, f"refused: {exc}", False)
    except httpx.InvalidURL as exc:
        return DeliveryResult(None, 0, f"refused: not a valid URL: {exc}", False)

    sent_headers = httpx.Headers(headers)
    sent_headers.update({
        "host": _host_header(hostname, target.port),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "accept-encoding": "identity",  # the reply is kept raw: no decompression (bombs) to cap
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature_header(secrets, msg_id, timestamp, body),
        # Every delivery gets its own connection: the pool is keyed by IP, so a kept-alive
        # connection could carry another host's request past its TLS check, and a fresh
        # connection is what arms the watchdog.
        "connection": "close",
    })

    owned = client is None
    if owned:
        # trust_env=False: an environment proxy would make the connection, defeating the IP pinning.
        client = httpx.Client(follow_redirects=False, trust_env=False)
    error = "no address to connect to"
    try:
        # Addresses were all checked; try them in the resolver's order until one accepts a connection.
        for address in addresses:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                error = f"no reply within {deadline_s:g} s"
                break
            watchdog = _Watchdog(remaining)
            extensions = {"trace": watchdog.trace}
            if target.scheme == "https":
                extensions["sni_hostname"] = hostname  # and the certificate is checked against it
            request = client.build_request("POST", target.copy_with(host=address), content=body,
                                           headers=sent_headers, timeout=httpx.Timeout(remaining),
                                           extensions=extensions)
            try:
                response = client.send(request, stream=True, follow_redirects=False)
            except httpx.ConnectError as exc:
                error = f"connection failed: {exc or type(exc).__name__}"
                watchdog.stop()
                continue
            except (httpx.TransportError, OSError) as exc:
                watchdog.stop()
                if watchdog.fired or isinstance(exc, httpx.TimeoutException):
                    error = f"no reply within {deadline_s:g} s"
                else:
                    error = f"connection failed: {exc or type(exc).__name__}"
                break
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
    finally:
        if owned:
            client.close()
    return DeliveryResult(None, elapsed_ms(), error, False)


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
