"""Shared pieces of the command line: JSON output, errors, progress bars, options."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from emix_core.errors import EmixError


def emit_json(data: Any) -> None:
    """One JSON object on stdout (the ``--json`` contract)."""
    click.echo(json.dumps(data, indent=None, sort_keys=True, default=str))


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn an :class:`EmixError` into a one-line message on stderr and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except EmixError as exc:
            if kwargs.get("as_json"):
                emit_json({"error": exc.code, "message": exc.message})
            click.secho(f"error: {exc.message}", fg="red", err=True)
            sys.exit(1)

    return wrapper


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
home_option = click.option(
    "--home",
    type=click.Path(file_okay=False),
    default=None,
    help="Home folder (default: $EMIX_HOME, else ~/.emix).",
)
hub_option = click.option(
    "--hub",
    "hub_url",
    envvar="EMIX_HUB_URL",
    default=None,
    help="Hub URL (env EMIX_HUB_URL; else the home's config).",
)
token_option = click.option(
    "--token",
    envvar="EMIX_TOKEN",
    default=None,
    help="API token (env EMIX_TOKEN; else the home's config).",
)


@contextmanager
def transfer_progress(label: str, enabled: bool) -> Iterator[Callable[[int, int], None]]:
    """A byte progress bar on a terminal; a no-op callback otherwise."""
    if not enabled or not sys.stderr.isatty():
        yield lambda done, total: None
        return
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        transient=True,
    ) as progress:
        task = progress.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


def client_for(hub_url: str | None, token: str | None, home: str | None) -> tuple[Any, Any]:
    """The facility home and a hub client from the standard options.

    :return: ``(LocalHome, HubClient)``; flags win over ``EMIX_*`` variables and config.
    """
    from emix_core.client.home import LocalHome
    from emix_core.config import resolve_home

    local = LocalHome(resolve_home(home))
    return local, local.client(hub_url, token)
