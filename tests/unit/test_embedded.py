"""`imagegate up`'s choices that need no process: the URL clients are given, and the port check."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import pytest

from imagegate.app.embedded import UpError, check_port, public_url


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "::"])
def test_a_wildcard_host_gives_urls_with_an_address_clients_can_use(wildcard):
    url = urlsplit(public_url(wildcard, 8000))
    assert url.hostname not in ("0.0.0.0", "::", "") and url.port == 8000
    socket.getaddrinfo(url.hostname, 8000)  # a real address of this machine


def test_a_named_host_is_kept():
    assert public_url("127.0.0.1", 8001) == "http://127.0.0.1:8001"
    assert public_url("::1", 8001) == "http://[::1]:8001"


def test_a_busy_port_is_named():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(UpError, match=f"port {port} on 127.0.0.1 is already in use.*--port"):
            check_port("127.0.0.1", port)
    check_port("127.0.0.1", port)  # free again
