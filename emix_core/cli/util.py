"""Shared pieces of the command line: JSON output, errors, progress bars, options."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import click

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


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def set_verbosity(level: int) -> None:
    """Log ``emix.*`` (and, at ``-vv``, HTTP connections) to stderr with timestamps."""
    if level <= 0:
        return
    import logging

    logging.basicConfig(format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger("emix").setLevel(logging.DEBUG)
    if level >= 2:
        logging.getLogger("urllib3").setLevel(logging.DEBUG)


def _verbose_callback(ctx: click.Context, _param: click.Parameter, value: int) -> None:
    if value:
        set_verbosity(value)


def _ca_bundle_callback(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value:
        import os

        # read by load_config for every hub client this process makes
        os.environ["EMIX_CA_BUNDLE"] = value


def verbose_param() -> click.Option:
    return click.Option(
        ["-v", "--verbose"],
        count=True,
        expose_value=False,
        is_eager=True,
        callback=_verbose_callback,
        help="Log what happens to stderr (-vv: every HTTP connection too).",
    )


def ca_bundle_param() -> click.Option:
    return click.Option(
        ["--ca-bundle"],
        type=click.Path(exists=True, dir_okay=False),
        default=None,
        expose_value=False,
        callback=_ca_bundle_callback,
        help="PEM file of the CA that signed the hub's certificate (env EMIX_CA_BUNDLE; "
        "else [client] ca_bundle, REQUESTS_CA_BUNDLE, SSL_CERT_FILE).",
    )


def add_common_options(command: click.Command) -> None:
    """Give a command (and, for a group, each subcommand) ``-v`` and ``--ca-bundle``."""
    names = {opt for p in command.params for opt in getattr(p, "opts", [])}
    if "--verbose" not in names:
        command.params.append(verbose_param())
    if "--ca-bundle" not in names:
        command.params.append(ca_bundle_param())
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            add_common_options(sub)


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
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

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


def echo_instance_outcomes(outcomes: Iterable[Any]) -> None:
    """On stderr, each instance a PACS refused (``failed``, red) or stored with a remark
    (``note``, yellow: decompressed, already there...), by item number, never by UID.

    :param outcomes: objects with ``status``, ``reason`` and ``instance.item_id``.
    """
    for outcome in outcomes:
        if outcome.status == "failed" or outcome.reason:
            failed = outcome.status == "failed"
            click.secho(
                f"{'failed' if failed else 'note'}: item {outcome.instance.item_id}: "
                f"{outcome.reason}",
                fg="red" if failed else "yellow",
                err=True,
            )
