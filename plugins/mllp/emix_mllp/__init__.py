"""emix-mllp: a gateway destination that sends reports to an EMR over MLLP.

Configured in ``gateway.toml``::

    [[destinations]]
    kind = "mllp"
    host = "emr-engine.example.org"
    port = 2575

Every report in an arrived package (HL7, CDA, FHIR, text; a PDF or RTF travels
inside the message as an ED attachment) is sent as an HL7 v2.5.1 ORU^R01 and must be
acknowledged (AA) by the interface engine; a NAK or a timeout is retried with backoff.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from emix_core import hookimpl
from emix_mllp.client import Ack, MllpClient, MllpError
from emix_mllp.destination import SETTINGS, MllpDestination

__all__ = ["Ack", "MllpClient", "MllpDestination", "MllpError", "SETTINGS"]


@hookimpl
def emix_register_destinations(register: Callable[..., None]) -> None:
    """Provide the ``mllp`` destination kind."""
    register("mllp", _factory)


def _factory(settings: dict[str, Any], gateway: Any) -> MllpDestination:
    return MllpDestination(settings, gateway)
