"""emix-cd-import: a patient's CD, USB stick, disc image or zip becomes a shared or
imported study; a package leaves as an IHE PDI disc image.

Registers, through the core's hooks:

- the ``emix cd inspect``, ``emix cd import`` and ``emix cd export`` commands,
- a gateway source of kind ``cd``: a folder where disc images or mounted media appear,
- the default answer of ``emix_reconcile_patient`` (``trylast``, so a master patient
  index plugin overrides it): an explicit local patient id, else no change.

Media are read without mounting them, and nothing on them is ever run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from emix_core import hookimpl

if TYPE_CHECKING:
    import click

__version__ = "0.1.0"
__all__ = ["emix_register_commands", "emix_register_sources", "emix_reconcile_patient"]


@hookimpl
def emix_register_commands(cli: click.Group) -> None:
    from emix_cd_import.cli import cd

    cli.add_command(cd)


@hookimpl
def emix_register_sources(register: Callable[..., None]) -> None:
    from emix_cd_import.gateway import CdSource

    register("cd", CdSource)


@hookimpl(trylast=True)
def emix_reconcile_patient(
    patient: dict[str, str], local_patient_id: str | None, source: str
) -> dict[str, str] | None:
    """Map to the local id the user gave; without one, keep the foreign identity."""
    if local_patient_id:
        return {"PatientID": local_patient_id}
    return {}
