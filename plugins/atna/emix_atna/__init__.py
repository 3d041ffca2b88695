"""emix ATNA forwarder: every audit event, as IHE ATNA expects, to an audit record repository.

Each event a home records (hub or facility side) becomes one DICOM PS3.15 A.5 audit
message per patient, sent as RFC 5424 syslog over TLS (RFC 5425 framing) to the
repository named in the home's ``emix.toml``::

    [atna]
    url = "tls://arr.hospital.example:6514"
    ca_bundle = "keys/arr-ca.pem"
    client_cert = "keys/node.pem"
    client_key = "keys/node.key"
    audit_source_id = "mercy-gateway-1"

Without an ``[atna] url`` (or ``EMIX_ATNA_URL``) the plugin stays idle: no thread, no
queue file. Messages wait in ``atna-queue.db`` in the home while the repository is down.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emix_atna.settings import AtnaSettings, load_settings
from emix_core import hookimpl, resolve_home

if TYPE_CHECKING:
    import click

    from emix_atna.forwarder import DiskQueue, Forwarder, frame, syslog_message
    from emix_core import AuditEvent

#: Re-exported from the forwarder, imported on first use (the plugin loads fast).
_FORWARDER_EXPORTS = frozenset({"DiskQueue", "Forwarder", "frame", "syslog_message"})

__all__ = [
    "AtnaSettings",
    "DiskQueue",
    "Forwarder",
    "forwarder_for",
    "frame",
    "load_settings",
    "syslog_message",
]

log = logging.getLogger("emix.atna")

#: Per process and home: a forked child (a gunicorn worker) starts its own sender thread.
_forwarders: dict[tuple[int, Path], Forwarder | None] = {}
_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    if name not in _FORWARDER_EXPORTS:
        raise AttributeError(f"module 'emix_atna' has no attribute {name!r}")
    return getattr(importlib.import_module("emix_atna.forwarder"), name)


def forwarder_for(home: str | Path | None) -> Forwarder | None:
    """The home's forwarder, started on first use; ``None`` when ATNA is not configured."""
    path = resolve_home(str(home) if home else None)
    key = (os.getpid(), path)
    with _lock:
        if key not in _forwarders:
            settings = load_settings(path)
            if settings:
                from emix_atna.forwarder import Forwarder

                _forwarders[key] = Forwarder(settings)
            else:
                _forwarders[key] = None
        return _forwarders[key]


@hookimpl
def emix_register_commands(cli: click.Group) -> None:
    """``emix atna status`` and ``emix atna flush``."""
    from emix_atna.cli import atna

    cli.add_command(atna)


@hookimpl
def emix_audit_event(event: AuditEvent, home: str | None) -> None:
    """Queue the event for the home's audit record repository, if one is configured."""
    forwarder = forwarder_for(home)
    if forwarder is not None:
        forwarder.record(event)


@atexit.register
def _flush_at_exit() -> None:
    """A short command (``emix send``) exits right after its event: send it first."""
    for (pid, _), forwarder in list(_forwarders.items()):
        if forwarder is None or pid != os.getpid():
            continue
        if not forwarder.flush(forwarder.settings.flush_seconds):
            log.warning(
                "%d audit messages still queued for %s; they go with the next emix run",
                len(forwarder.queue),
                forwarder.settings.url,
            )
