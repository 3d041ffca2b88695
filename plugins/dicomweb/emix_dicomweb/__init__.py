"""emix-dicomweb: move studies PACS to PACS through the hub, with DICOMweb only.

Registers, through the core's hooks:

- the ``emix dicomweb send`` and ``emix dicomweb deliver`` commands,
- a gateway source and a gateway destination of kind ``dicomweb``,
- a read-only DICOMweb endpoint per package on the hub (QIDO-RS, WADO-RS).

Only standard DICOMweb is spoken, so any PACS works, not only Orthanc.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from emix_core import hookimpl

if TYPE_CHECKING:
    import click

__version__ = "0.1.0"


@hookimpl
def emix_register_commands(cli: click.Group) -> None:
    from emix_dicomweb.cli import dicomweb

    cli.add_command(dicomweb)


@hookimpl
def emix_register_sources(register: Callable[..., None]) -> None:
    from emix_dicomweb.gateway import DicomwebSource

    register("dicomweb", DicomwebSource)


@hookimpl
def emix_register_destinations(register: Callable[..., None]) -> None:
    from emix_dicomweb.gateway import DicomwebDestination

    register("dicomweb", DicomwebDestination)


@hookimpl
def emix_register_blueprints(register: Callable[..., Any]) -> None:
    from emix_dicomweb.origin import bp

    register(bp)
