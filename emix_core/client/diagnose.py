"""Why a hub could not be reached: DNS, TCP, TLS, wrong protocol, not an emix hub.

Each cause gets a message a PACS administrator can act on. Used by :class:`HubClient`
on every failed connection and by ``emix doctor``.
"""

from __future__ import annotations

import errno
import socket
import ssl
from urllib.parse import urlsplit

import requests

CA_HINT = (
    "if the hub uses a private certificate authority, pass --ca-bundle FILE, set "
    "REQUESTS_CA_BUNDLE or SSL_CERT_FILE, or set ca_bundle in the [client] table of emix.toml"
)


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception, its causes and the ``reason``/``args`` urllib3 nests them in."""
    seen: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if current in seen or len(seen) > 20:
            continue
        seen.append(current)
        for nested in (
            current.__cause__,
            current.__context__,
            getattr(current, "reason", None),
            *[a for a in getattr(current, "args", ()) if isinstance(a, BaseException)],
        ):
            if isinstance(nested, BaseException):
                todo.append(nested)
    return seen


def connection_cause(base: str, exc: BaseException) -> tuple[str, str]:
    """Classify a failed connection to ``base``.

    :return: ``(kind, message)``; kind is one of ``dns``, ``refused``, ``tls-certificate``,
        ``tls-protocol``, ``not-tls``, ``timeout``, ``connection``.
    """
    parts = urlsplit(base)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    chain = _chain(exc)
    text = " ".join(str(e) for e in chain)
    if any(isinstance(e, ssl.SSLCertVerificationError) for e in chain) or (
        "CERTIFICATE_VERIFY_FAILED" in text
    ):
        detail = next(
            (e.verify_message for e in chain if isinstance(e, ssl.SSLCertVerificationError)),
            "certificate verify failed",
        )
        return (
            "tls-certificate",
            f"the TLS certificate of {host}:{port} could not be verified ({detail}); {CA_HINT}",
        )
    if "hostname mismatch" in text or "doesn't match" in text:
        return (
            "tls-certificate",
            f"the TLS certificate of {host}:{port} is not for the name {host!r}; "
            "use the name the certificate was issued for",
        )
    if (
        "WRONG_VERSION_NUMBER" in text
        or "record layer failure" in text
        or ("packet length too long" in text)
    ):
        plain = base.replace("https://", "http://", 1)
        return (
            "tls-protocol",
            f"{host}:{port} does not speak HTTPS (plain HTTP answered the TLS handshake); "
            f"use {plain}, or point the URL at the hub's TLS port",
        )
    if any(isinstance(e, requests.exceptions.SSLError | ssl.SSLError) for e in chain):
        return ("tls-protocol", f"the TLS handshake with {host}:{port} failed: {_short(chain)}")
    if (
        any(isinstance(e, socket.gaierror) for e in chain)
        or "NameResolutionError" in text
        or ("Name or service not known" in text or "Failed to resolve" in text)
    ):
        return (
            "dns",
            f"cannot reach the hub: its host name {host!r} could not be resolved (DNS); "
            "check the spelling of the hub URL and this machine's DNS settings",
        )
    if (
        any(
            isinstance(e, ConnectionRefusedError)
            or (isinstance(e, OSError) and e.errno == errno.ECONNREFUSED)
            for e in chain
        )
        or "Connection refused" in text
    ):
        return (
            "refused",
            f"cannot reach the hub: nothing is listening at {host}:{port} (connection "
            "refused); check the port and that the hub is running "
            "(`systemctl status emix-hub` on a service install)",
        )
    if any(isinstance(e, requests.Timeout | TimeoutError | socket.timeout) for e in chain):
        return (
            "timeout",
            f"cannot reach the hub: {host}:{port} did not answer in time "
            "(a firewall, or a busy hub)",
        )
    if parts.scheme == "http" and ("RemoteDisconnected" in text or "reset by peer" in text):
        secure = base.replace("http://", "https://", 1)
        return (
            "not-tls",
            f"{host}:{port} closed the connection without an answer; if it serves HTTPS, "
            f"use {secure}",
        )
    return ("connection", f"cannot reach the hub at {base}: {_short(chain)}")


def _short(chain: list[BaseException]) -> str:
    last = chain[-1]
    return f"{type(last).__name__}: {str(last)[:200]}"
