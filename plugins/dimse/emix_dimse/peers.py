"""DICOM application entities as an administrator writes them: ``AET@HOST:PORT``
for a peer to call, ``AET`` or ``AET@HOST`` for a caller the listener accepts."""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

from emix_core import ConfigError

__all__ = ["AE_TITLE_RE", "AllowedCaller", "Peer", "check_ae_title", "parse_allow", "parse_peer"]

#: 1 to 16 characters of the Default Character Repertoire, no backslash, not all spaces.
AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


def check_ae_title(value: str, what: str = "AE title") -> str:
    """A valid AE title, stripped; :class:`ConfigError` otherwise."""
    title = value.strip()
    if not title or not AE_TITLE_RE.match(title):
        raise ConfigError(
            f"{what} must be 1 to 16 printable ASCII characters without backslash, "
            "e.g. EMIX or CT_SCANNER_1"
        )
    return title


@dataclass(frozen=True)
class Peer:
    """A DICOM node emix calls: its AE title, host and port."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_peer(text: str) -> Peer:
    """``AET@HOST:PORT`` (``[::1]`` for an IPv6 address) → :class:`Peer`."""
    match = re.match(r"^(?P<aet>[^@]+)@(?P<host>\[[0-9a-fA-F:.]+\]|[^:@\s]+):(?P<port>\d+)$", text)
    if not match:
        raise ConfigError("a DICOM peer is written AET@HOST:PORT, e.g. ORTHANC@pacs.local:104")
    port = int(match["port"])
    if not 0 < port < 65536:
        raise ConfigError("the port of a DICOM peer must be between 1 and 65535")
    return Peer(
        check_ae_title(match["aet"], "the peer's AE title"), match["host"].strip("[]"), port
    )


@dataclass(frozen=True)
class AllowedCaller:
    """A calling AE the listener accepts, from one host or any (``host`` empty)."""

    ae_title: str
    host: str = ""
    addresses: frozenset[str] = frozenset()

    def matches(self, ae_title: str, address: str) -> bool:
        if ae_title.strip() != self.ae_title:
            return False
        return not self.host or _normal(address) in self.addresses

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}" if self.host else self.ae_title


def _normal(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ip)


def parse_allow(text: str) -> AllowedCaller:
    """``AET`` or ``AET@HOST``; a host name is resolved once, to all its addresses."""
    aet, _, host = text.partition("@")
    title = check_ae_title(aet, "an allowed calling AE title")
    host = host.strip().strip("[]")
    if not host:
        return AllowedCaller(title)
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise ConfigError(f"cannot resolve the host of allowed caller {title}: {exc}") from exc
    return AllowedCaller(title, host, frozenset(_normal(str(i[4][0])) for i in infos))
