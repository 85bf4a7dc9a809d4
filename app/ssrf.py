"""Refusing URLs that point into our own network (SSRF), for any URL a client hands us.

Shared by the web intake (check a URL when it is registered) and the workers (check it again right
before connecting, then connect to the very address that was checked). Pure stdlib on purpose: app/
never imports httpx.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Hosts that inet_aton may read as an IPv4 address in integer, hex or octal form ("2130706433",
# "0x7f000001", "0177.1"). Anything else is a name for getaddrinfo.
_IPV4_SHORTHAND = re.compile(r"[0-9a-fx.]+")


class UnsafeUrl(ValueError):
    """A URL we refuse to connect to; the message says why and is safe to show the client."""


def check_address(ip: str | IPAddress) -> None:
    """Raise UnsafeUrl unless ip is a public unicast address."""
    try:
        address = ip if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)) else ipaddress.ip_address(ip)
    except ValueError:
        raise UnsafeUrl(f"{ip!r} is not an IP address") from None
    if address.version == 6:
        # ::ffff:a.b.c.d reaches the IPv4 host on dual-stack sockets; the mapped address is named in
        # the message, but mapped addresses are refused whatever they map to.
        if address.ipv4_mapped is not None:
            raise UnsafeUrl(f"{address} is an IPv4-mapped IPv6 address (of {address.ipv4_mapped})")
        # 6to4 (2002::/16) carries an IPv4 address that is_global does not look into.
        if address.sixtofour is not None:
            check_address(address.sixtofour)
    kinds = [
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),  # 224/4 and ff00::/8 count as "global" in ipaddress
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        ("site-local", address.version == 6 and address.is_site_local),  # fec0::/10, also "global"
        ("not globally routable", not address.is_global),  # CGNAT 100.64/10, documentation ranges, ...
    ]
    for kind, matches in kinds:
        if matches:
            raise UnsafeUrl(f"{address} is not a public address ({kind})")


def _literal_address(host: str) -> IPAddress | None:
    """The address a host names literally, in any form the OS resolver would accept, else None."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _IPV4_SHORTHAND.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            pass
    return None


def resolve_public(url: str, *, allow_private: bool = False) -> tuple[str, list[str]]:
    """Resolve url's host once and check every address it resolves to.

    Returns (hostname, addresses): the ASCII hostname (for the Host header and TLS SNI) and the
    checked addresses, the only ones the caller may connect to. Raises UnsafeUrl for a URL that is
    not http(s), has no host, does not resolve, or (unless allow_private) resolves to any
    non-public address: one bad address among good ones is enough, as the caller could be
    steered to any of them.
    """
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a malformed port
    except ValueError as exc:
        raise UnsafeUrl(f"not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UnsafeUrl(f"only http and https URLs are allowed, not {scheme or 'no scheme'!r}")
    host = parts.hostname  # lowercased, IPv6 brackets removed
    if not host:
        raise UnsafeUrl("the URL has no host")
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise UnsafeUrl(f"{host!r} is not a valid host name") from None

    return host, resolve_host(host, port or (443 if scheme == "https" else 80), allow_private=allow_private)


def resolve_host(host: str, port: int, *, allow_private: bool = False) -> list[str]:
    """The addresses an ASCII host name (or address literal) resolves to, every one checked unless
    allow_private: the only ones the caller may connect to. Raises UnsafeUrl as resolve_public."""
    literal = _literal_address(host)
    if literal is not None:
        addresses = [str(literal)]
    else:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            raise UnsafeUrl(f"{host} does not resolve") from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))  # unique, resolver order kept
        if not addresses:
            raise UnsafeUrl(f"{host} does not resolve")
    if not allow_private:
        for address in addresses:
            check_address(address)
    return addresses
