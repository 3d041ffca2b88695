"""emix-mllp: a gateway destination that sends reports to an EMR over MLLP.

Configured in ``gateway.toml``::

    [[destinations]]
    kind = "mllp"
    host = "emr-engine.example.org"
    port = 2575

Every report in an arrived package (HL7, CDA, FHIR, text; a PDF or RTF travels
inside the message as an ED attachment) is sent as an HL7 v2.5.1 ORU^R01 and must be
acknowledged by the interface engine: ``AA`` (or ``CA`` then the application ACK in
enhanced mode) is delivered, ``AR``/``CR`` is final and never resent, ``AE``/``CE`` or a
timeout is retried with backoff. Each message's outcome is in the delivery report and
the audit trail.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from emix_core import hookimpl

if TYPE_CHECKING:
    from emix_mllp.client import Ack, Delivery, MllpClient, MllpError, MllpRejected
    from emix_mllp.destination import SETTINGS, MllpDestination

#: Re-exported names and their modules, imported on first use (the plugin loads fast).
_EXPORTS = {
    "Ack": "emix_mllp.client",
    "Delivery": "emix_mllp.client",
    "MllpClient": "emix_mllp.client",
    "MllpError": "emix_mllp.client",
    "MllpRejected": "emix_mllp.client",
    "MllpDestination": "emix_mllp.destination",
    "SETTINGS": "emix_mllp.destination",
}

__all__ = [
    "Ack",
    "Delivery",
    "MllpClient",
    "MllpDestination",
    "MllpError",
    "MllpRejected",
    "SETTINGS",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'emix_mllp' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


@hookimpl
def emix_register_destinations(register: Callable[..., None]) -> None:
    """Provide the ``mllp`` destination kind."""
    register("mllp", _factory)


def _factory(settings: dict[str, Any], gateway: Any) -> MllpDestination:
    from emix_mllp.destination import MllpDestination

    return MllpDestination(settings, gateway)
