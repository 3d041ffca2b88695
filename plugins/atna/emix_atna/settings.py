"""The ``[atna]`` table of a home's ``emix.toml``, with ``EMIX_ATNA_*`` overrides."""

from __future__ import annotations

import os
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from emix_core import ConfigError

__all__ = ["AtnaSettings", "load_settings"]

_KEYS = (
    "url",
    "ca_bundle",
    "client_cert",
    "client_key",
    "audit_source_id",
    "enterprise_site_id",
    "app_name",
    "retry_seconds",
    "flush_seconds",
    "timeout_seconds",
    "handshake_wait_seconds",
)


@dataclass
class AtnaSettings:
    """Where and how to send audit messages.

    :param url: the audit record repository, ``tls://host:6514``.
    :param ca_bundle: CA certificates that sign the repository's certificate (PEM);
        empty: the system's.
    :param client_cert: this node's certificate (PEM) for mutual TLS, as ATNA wants.
    :param client_key: its private key (PEM).
    :param audit_source_id: ``AuditSourceID`` naming this node (default: host name).
    :param enterprise_site_id: ``AuditEnterpriseSiteID`` (e.g. the facility's address).
    :param app_name: syslog APP-NAME.
    :param retry_seconds: pause between attempts while the repository is unreachable.
    :param flush_seconds: at most this long at exit to send what is still queued.
    :param timeout_seconds: connect and send timeout.
    :param handshake_wait_seconds: after connecting, how long to wait for the repository
        to refuse the client certificate before sending (TLS 1.3 tells only then).
    """

    home: Path
    url: str
    host: str
    port: int
    ca_bundle: str = ""
    client_cert: str = ""
    client_key: str = ""
    audit_source_id: str = ""
    enterprise_site_id: str = ""
    app_name: str = "emix"
    retry_seconds: float = 5.0
    flush_seconds: float = 5.0
    timeout_seconds: float = 10.0
    handshake_wait_seconds: float = 0.5

    @property
    def queue_path(self) -> Path:
        """The disk queue: messages wait here until the repository has them."""
        return self.home / "atna-queue.db"


def load_settings(home: str | os.PathLike[str]) -> AtnaSettings | None:
    """The home's ATNA settings, or ``None`` when no repository is configured.

    :raises ConfigError: the table has an unknown key, a wrong value or a missing file.
    """
    home = Path(home)
    values: dict[str, Any] = {}
    file = home / "emix.toml"
    if file.exists():
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file} is not valid TOML: {exc}") from exc
        table = data.get("atna", {})
        if not isinstance(table, dict):
            raise ConfigError("[atna] in emix.toml must be a table")
        for key in table:
            if key not in _KEYS:
                raise ConfigError(f"unknown setting [atna] {key} in emix.toml")
        values.update(table)
    for key in _KEYS:
        env = os.environ.get(f"EMIX_ATNA_{key.upper()}")
        if env:
            values[key] = env
    url = str(values.pop("url", "") or "").strip()
    if not url:
        return None
    parts = urlsplit(url)
    if parts.scheme != "tls" or not parts.hostname:
        raise ConfigError(
            "[atna] url must be tls://host:port (syslog over TLS, RFC 5425), "
            "e.g. tls://arr.hospital.example:6514"
        )
    try:
        port = parts.port or 6514
    except ValueError:
        raise ConfigError("[atna] url has a port that is not a number") from None
    settings = AtnaSettings(home=home, url=url, host=parts.hostname, port=port)
    for key, value in values.items():
        default = getattr(settings, key)
        try:
            value = type(default)(value)
        except (TypeError, ValueError):
            raise ConfigError(f"[atna] {key} must be a {type(default).__name__}") from None
        setattr(settings, key, value)
    for key in ("ca_bundle", "client_cert", "client_key"):
        path = getattr(settings, key)
        if path:
            resolved = (home / Path(path).expanduser()).resolve()
            if not resolved.is_file():
                raise ConfigError(f"[atna] {key}: no such file {resolved}")
            setattr(settings, key, str(resolved))
    if bool(settings.client_cert) != bool(settings.client_key):
        raise ConfigError("[atna] client_cert and client_key go together")
    settings.audit_source_id = settings.audit_source_id or socket.gethostname()
    return settings
