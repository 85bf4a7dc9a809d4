"""HTTP to URLs that clients or upstreams hand us (webhook receivers, image links): one policy.

The check happens where the socket is opened: the host name is resolved once, every address it
resolves to is checked (app.ssrf), and the connection goes to a checked address. So a DNS answer
that changes between check and connect (DNS rebinding) cannot steer a request into our network.
The connection pool stays keyed by host name, so the Host header, TLS SNI and the certificate
check all use the name, and a kept-alive connection is one that was made to a checked address.

The configured upstreams' own origins are the operator's choice, not a client's: calls to them use
the fast client of workers.http, unchecked.
"""

from __future__ import annotations

import ssl
import typing

import httpcore
import httpx

from imagegate.app.ssrf import resolve_host


class CheckedBackend(httpcore.SyncBackend):
    """Opens TCP connections only to addresses that passed the check."""

    def __init__(self, *, allow_private: bool):
        self.allow_private = allow_private

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable | None = None,
    ) -> httpcore.NetworkStream:
        # Raises app.ssrf.UnsafeUrl, which httpx passes through to the caller unchanged.
        addresses = resolve_host(host, port, allow_private=self.allow_private)
        failure: httpcore.ConnectError | None = None
        for address in addresses:  # all checked: try them in the resolver's order
            try:
                return super().connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                failure = exc
        raise failure


class CheckedTransport(httpx.HTTPTransport):
    """httpx's own transport, its connections opened by CheckedBackend."""

    def __init__(self, *, allow_private: bool, verify: ssl.SSLContext | bool = True, max_connections: int = 200):
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=32)
        # No proxy from the environment: a proxy would make the connection, defeating the check.
        ssl_context = httpx.create_ssl_context(verify=verify, trust_env=False)
        super().__init__(verify=ssl_context, trust_env=False, limits=limits)
        # httpx takes no network backend: the pool it builds, with ours (tests/test_outbound.py
        # fails if this stops being the pool requests go through).
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=CheckedBackend(allow_private=allow_private),
        )


def make_client(
    *, allow_private: bool, verify: ssl.SSLContext | bool = True, max_connections: int = 200
) -> httpx.Client:
    """A client that connects only to checked addresses (any address when allow_private) and never
    follows redirects. A request it refuses raises app.ssrf.UnsafeUrl."""
    transport = CheckedTransport(allow_private=allow_private, verify=verify, max_connections=max_connections)
    return httpx.Client(
        transport=transport, trust_env=False, follow_redirects=False, headers={"User-Agent": "imagegate"}
    )


class CheckedClients:
    """A worker's checked clients, one per policy: separate pools, so a connection opened where
    private addresses are allowed is never reused where they are not."""

    def __init__(self) -> None:
        self._by_policy = {allow: make_client(allow_private=allow) for allow in (False, True)}

    def client(self, *, allow_private: bool) -> httpx.Client:
        return self._by_policy[allow_private]

    def close(self) -> None:
        for client in self._by_policy.values():
            client.close()


def same_origin(url: str, base_url: str | None) -> bool:
    """Whether url has base_url's scheme, host and port."""
    if not base_url:
        return False
    try:
        a, b = httpx.URL(url), httpx.URL(base_url)
    except httpx.InvalidURL:
        return False
    # httpx lowercases the host and drops a scheme's default port, so equal origins compare equal.
    return bool(a.host) and (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)
