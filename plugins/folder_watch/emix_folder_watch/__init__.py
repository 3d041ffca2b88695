"""emix drop-folder adapter: a watched outbox sends studies, an inbox folder receives them.

Registers the gateway kinds ``folder`` (a source: ``[[sources]] kind = "folder"``) and
``folder`` (a destination: ``[[destinations]] kind = "folder"``). Nothing is watched and
no thread starts unless a ``gateway.toml`` configures such a table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from emix_core import hookimpl

if TYPE_CHECKING:
    from emix_core import Gateway

__version__ = "0.1.0"
__all__ = ["emix_register_sources", "emix_register_destinations"]


def _outbox(settings: dict[str, Any], gateway: Gateway) -> Any:
    from emix_folder_watch.outbox import FolderSource

    return FolderSource(settings, gateway)


def _inbox(settings: dict[str, Any], gateway: Gateway) -> Any:
    from emix_folder_watch.inbox import FolderDestination

    return FolderDestination(settings, gateway)


@hookimpl
def emix_register_sources(register: Callable[..., None]) -> None:
    """Provide the ``folder`` source kind (a watched drop folder)."""
    register("folder", _outbox)


@hookimpl
def emix_register_destinations(register: Callable[..., None]) -> None:
    """Provide the ``folder`` destination kind (an inbox folder)."""
    register("folder", _inbox)
