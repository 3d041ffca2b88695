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

from collections.abc import Callable
from typing import Any

from emix_core import hookimpl
from emix_mllp.client import Ack, Delivery, MllpClient, MllpError, MllpRejected
from emix_mllp.destination import SETTINGS, MllpDestination

__all__ = [
    "Ack",
    "Delivery",
    "MllpClient",
    "MllpDestination",
    "MllpError",
    "MllpRejected",
    "SETTINGS",
]


@hookimpl
def emix_register_destinations(register: Callable[..., None]) -> None:
    """Provide the ``mllp`` destination kind."""
    register("mllp", _factory)


def _factory(settings: dict[str, Any], gateway: Any) -> MllpDestination:
    return MllpDestination(settings, gateway)
