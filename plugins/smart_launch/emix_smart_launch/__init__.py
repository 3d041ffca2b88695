"""emix SMART on FHIR app: a clinician opens emix from the EMR's chart, in the patient's
context, without a second sign-in (SMART App Launch 2.x, EHR and standalone launch).

The hub serves ``/smart/launch`` and ``/smart/callback`` once this plugin is installed; the
``[smart]`` table of the hub's ``emix.toml`` says which EMRs may launch it (docs/smart.md).
"""

from __future__ import annotations

from collections.abc import Callable

import click

from emix_core import hookimpl

__all__ = ["emix_register_blueprints", "emix_register_commands"]


@hookimpl
def emix_register_blueprints(register: Callable[..., None]) -> None:
    from . import pages, share  # noqa: F401  (their routes join the blueprint)
    from .views import bp

    register(bp)
    register(share.api)


@hookimpl
def emix_register_commands(cli: click.Group) -> None:
    from .cli import smart

    cli.add_command(smart)
