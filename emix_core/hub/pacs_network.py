"""Where "Send to my PACS" may connect: the hub operator's network allowlist.

A facility administrator names their PACS on a web page, and the hub then connects to
it. Without a limit that is a server-side request forgery: an administrator could point
the hub at its own loopback services, a cloud metadata address or a database next to
it, and read what answers from the outcome. The hub operator decides with
``[hub] pacs_networks``:

- empty (the default): any address except loopback, link-local (cloud metadata lives at
  169.254.169.254), unspecified, multicast and reserved ones;
- a list of networks (``["10.20.0.0/16", "192.168.7.0/24"]``): those only.

The check is made on the address actually connected to, after name resolution, so a
name that resolves to an allowed address when saved and a forbidden one later (DNS
rebinding) is still refused.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from emix_core.errors import ConfigError, PolicyRejected

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

REFUSED = (
    "the hub's operator does not allow connections to this PACS address; ask them to add "
    "the PACS's network to [hub] pacs_networks"
)


def parse_networks(values: Sequence[str]) -> list[Network]:
    """``[hub] pacs_networks`` as networks; :class:`ConfigError` naming a bad entry."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(str(value).strip(), strict=False))
        except ValueError:
            raise ConfigError(
                f"[hub] pacs_networks: {value!r} is not a network; write e.g. 10.20.0.0/16"
            ) from None
    return networks


def _address(text: str) -> IPAddress:
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


def _embedded(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries to a relay (6to4, Teredo): a relay or tunnel
    on the hub's network would deliver there. (IPv4-compatible and NAT64 forms lie in
    ``::/8``, which ``is_reserved`` refuses already.)"""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    found = [ip.sixtofour] if ip.sixtofour else []
    return found + list(ip.teredo or ())


def _forbidden(ip: IPAddress) -> bool:
    return (
        ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast or ip.is_reserved
    )


def is_allowed(address: str, networks: Sequence[Network]) -> bool:
    """Whether the hub may connect to ``address`` under the operator's ``networks``."""
    try:
        ip = _address(address)
    except ValueError:
        return False
    if networks:
        return any(ip.version == net.version and ip in net for net in networks)
    return not any(_forbidden(a) for a in [ip, *_embedded(ip)])


def check_literal(host: str, networks: Sequence[Network]) -> None:
    """Refuse at once a host written as a forbidden address (names are checked later,
    on the address actually connected to)."""
    try:
        _address(host.strip("[]"))
    except ValueError:
        return
    if not is_allowed(host.strip("[]"), networks):
        raise PolicyRejected(REFUSED)


def resolve_allowed(host: str, port: int, networks: Sequence[Network]) -> str:
    """The first address of ``host`` the hub may connect to.

    :raises PolicyRejected: no address of ``host`` is allowed (or it does not resolve).
    """
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except OSError:
        raise PolicyRejected(
            "the PACS's host name does not resolve from the hub; check the name"
        ) from None
    for *_, sockaddr in infos:
        if is_allowed(str(sockaddr[0]), networks):
            return str(sockaddr[0])
    raise PolicyRejected(REFUSED)


def _checked(sock: socket.socket, networks: Sequence[Network]) -> socket.socket:
    peer = sock.getpeername()[0]
    if not is_allowed(str(peer), networks):
        sock.close()
        raise PolicyRejected(REFUSED)
    return sock


def guarded_session(networks: Sequence[Network]) -> requests.Session:
    """A ``requests`` session whose every connection is checked against ``networks``
    once connected (before a byte of the request is sent), and which ignores proxy
    settings from the environment."""

    class CheckedHTTP(HTTPConnection):
        def _new_conn(self) -> socket.socket:
            return _checked(super()._new_conn(), networks)

    class CheckedHTTPS(HTTPSConnection):
        def _new_conn(self) -> socket.socket:
            return _checked(super()._new_conn(), networks)

    class Pool(HTTPConnectionPool):
        ConnectionCls = CheckedHTTP

    class TLSPool(HTTPSConnectionPool):
        ConnectionCls = CheckedHTTPS

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": Pool, "https": TLSPool}

    session = requests.Session()
    session.trust_env = False  # no proxy from the environment: the check is on the PACS
    session.mount("http://", Adapter())
    session.mount("https://", Adapter())
    return session
