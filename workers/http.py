"""HTTP for the workers: one httpx client per process for the upstreams, calls bounded by a total
deadline, and image downloads that refuse oversize bodies (and, through a client of
workers.outbound, addresses its policy refuses)."""

from __future__ import annotations

import itertools
import select
import socket
import sys
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from imagegate.app.failures import ErrorCode
from imagegate.app.ssrf import UnsafeUrl
from imagegate.workers.adapters.base import UpstreamError

MAX_REPLY_BYTES = 64 * 1024 * 1024  # an upstream's JSON reply may carry several base64 images

# Which call of which attempt is being made: sent as Idempotency-Key, so an upstream that honours it
# (and any log) can tell a repeated call of one attempt from a new attempt.
current_call: ContextVar[str | None] = ContextVar("current_call", default=None)


# Connections per pool. httpcore's pool walks all its connections and queued requests on every
# request and every release, so one pool holding a thousand calls spent most of the worker's CPU
# there; small pools keep that walk short.
POOL_SHARD_SIZE = 32


class ShardedTransport(httpx.BaseTransport):
    """Spreads requests round-robin over several small connection pools."""

    def __init__(self, max_connections: int, shard_size: int = POOL_SHARD_SIZE):
        # Keep every connection alive: a closed one costs a new connect and name lookup next time.
        limits = httpx.Limits(max_connections=shard_size, max_keepalive_connections=shard_size)
        # One TLS context for every shard: building one loads the CA bundle (~0.1 s of CPU), so a
        # context per shard delayed a 1,000-slot worker's first call by seconds.
        tls = httpx.create_ssl_context()
        shards = max(1, -(-max_connections // shard_size))
        self._shards = [httpx.HTTPTransport(verify=tls, limits=limits) for _ in range(shards)]
        self._turn = itertools.count()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._shards[next(self._turn) % len(self._shards)].handle_request(request)

    def close(self) -> None:
        for shard in self._shards:
            shard.close()


def make_client(max_connections: int = 200) -> httpx.Client:
    return httpx.Client(
        transport=ShardedTransport(max_connections), follow_redirects=False, headers={"User-Agent": "imagegate"}
    )


def socket_readable(sock: socket.socket | None, poll: Callable[[], Any] = select.poll) -> bool:
    """httpcore's test of an idle keep-alive connection before it is reused: readable means the
    server closed it (or sent something unasked), so it is not reused. A socket gone is readable."""
    fileno = -1 if sock is None else sock.fileno()
    if fileno < 0:
        return True
    poller = poll()
    poller.register(fileno, select.POLLIN)
    return bool(poller.poll(0))


def check_idle_connections_without_the_hub() -> None:
    """For every httpx client of this process: httpcore asks select.poll, with no wait, whether
    each idle connection is readable before it reuses one. Under gevent that poll is gevent's,
    which starts and stops watchers through the hub: 2.6% of a sync request's worker CPU. A poll
    that does not wait never blocks, so the original poll gives the same answer without the hub.
    Does nothing unless gevent has patched select."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("select"):
        return
    from httpcore._backends import sync

    original = monkey.get_original("select", "poll")
    if hasattr(sync, "is_socket_readable"):  # where httpcore's sync streams look it up
        sync.is_socket_readable = lambda sock: socket_readable(sock, original)


@dataclass(frozen=True)
class Reply:
    status: int
    headers: httpx.Headers
    body: bytes


def request(
    client: httpx.Client,
    method: str,
    url: httpx.URL,
    *,
    deadline_s: float,
    max_bytes: int = MAX_REPLY_BYTES,
    **kwargs,
) -> Reply:
    """One call that ends within deadline_s however slowly the peer sends, or raises UpstreamError.
    The URL comes parsed: httpx parses a str on every request (3% of a busy worker's CPU)."""
    started = time.monotonic()
    if current_call.get():
        kwargs["headers"] = {"Idempotency-Key": current_call.get()} | (kwargs.get("headers") or {})
    try:
        with client.stream(method, url, timeout=httpx.Timeout(deadline_s), **kwargs) as response:
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise UpstreamError(
                        ErrorCode.UPSTREAM_BAD_RESPONSE,
                        f"reply larger than {max_bytes} bytes",
                        retryable=False,
                        upstream_status=response.status_code,
                    )
                if time.monotonic() - started > deadline_s:
                    raise httpx.ReadTimeout("total deadline exceeded")
                chunks.append(chunk)
            return Reply(response.status_code, response.headers, b"".join(chunks))
    except httpx.TimeoutException:
        raise UpstreamError(
            ErrorCode.UPSTREAM_TIMEOUT, f"no complete reply within {deadline_s:g} s", retryable=True
        ) from None
    except httpx.TransportError as exc:
        raise UpstreamError(
            ErrorCode.UPSTREAM_ERROR, f"connection failed: {type(exc).__name__}", retryable=True
        ) from None


def retry_after_s(headers: httpx.Headers) -> float | None:
    """Retry-After as seconds (delta or HTTP date)."""
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def download(client: httpx.Client, url: str, *, max_bytes: int, deadline_s: float) -> bytes:
    """GET an image; the client decides which addresses may be reached (see workers.outbound)."""
    try:
        parsed = httpx.URL(url)
        if parsed.scheme not in ("http", "https"):
            raise UnsafeUrl(f"only http and https URLs are allowed: {url[:100]!r}")
        reply = request(client, "GET", parsed, deadline_s=deadline_s, max_bytes=max_bytes)
    except (UnsafeUrl, httpx.InvalidURL) as exc:
        raise UpstreamError(ErrorCode.UPSTREAM_BAD_RESPONSE, f"image URL refused: {exc}", retryable=False) from None
    if reply.status != 200:
        raise UpstreamError(
            ErrorCode.UPSTREAM_ERROR if reply.status >= 500 else ErrorCode.UPSTREAM_BAD_RESPONSE,
            f"image download answered {reply.status}",
            retryable=reply.status >= 500,
            upstream_status=reply.status,
        )
    return reply.body
