"""emix-dimse: classic DICOM networking (DIMSE) for emix.

Registers, through the core's hooks:

- the ``emix dimse`` commands: ``listen`` (a C-ECHO/C-STORE SCP sending what arrives
  through the hub), ``echo``, ``send`` (C-FIND then C-GET or C-MOVE) and ``deliver``
  (C-STORE of a received package),
- a gateway source and a gateway destination of kind ``dimse``,
- the hub's "Send to my PACS" into a DICOM node (``emix_pacs_push``, C-STORE).
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
    from emix_dimse.cli import dimse

    cli.add_command(dimse)


@hookimpl
def emix_register_sources(register: Callable[..., None]) -> None:
    from emix_dimse.source import DimseSource

    register("dimse", DimseSource)


@hookimpl
def emix_register_destinations(register: Callable[..., None]) -> None:
    from emix_dimse.delivery import DimseDestination

    register("dimse", DimseDestination)


@hookimpl
def emix_pacs_push(content: Any, target: str) -> dict[str, Any] | None:
    from emix_dimse.hub_push import push_package

    return push_package(content, target)
