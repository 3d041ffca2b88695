"""The ``emix`` command line, built by :func:`build_cli`.

Core commands are named by the factory and imported when asked for; adapters add theirs
through ``emix_register_commands``, loaded only when a command that is not the core's is
asked for (or ``--help`` lists them), so ``emix --version`` imports neither the hub nor
DICOM, crypto or HTTP libraries.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from emix_core import __version__
from emix_core.cli.util import (
    add_common_options,
    ca_bundle_param,
    emit_json,
    handle_errors,
    home_option,
    hub_option,
    json_option,
    token_option,
    transfer_progress,
    verbose_param,
)
from emix_core.errors import EmixError

#: Core commands defined in other modules: name -> ``module:attribute``, imported on use.
CORE_COMMANDS: dict[str, str] = {
    "doctor": "emix_core.cli.doctor:doctor",
    "hub": "emix_core.cli.admin:hub",
    "audit": "emix_core.cli.admin:audit",
    "retention": "emix_core.cli.admin:retention",
    "member": "emix_core.cli.admin:member",
    "members": "emix_core.cli.accounts:members",
    "token": "emix_core.cli.accounts:token",
    "keys": "emix_core.cli.admin:keys",
    "demo": "emix_core.cli.demo:demo",
    "gateway": "emix_core.cli.gateway:gateway",
    "report": "emix_core.reports.cli:report",
    "viewer": "emix_core.cli.viewer:viewer",
}


class EmixCLI(click.Group):
    """The top-level group: core commands on use, plugin commands on first need."""

    def __init__(self, *args: Any, pm: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pm = pm
        self._plugins_loaded = False
        self._lazy: dict[str, str] = {}

    def add_lazy_command(self, name: str, target: str) -> None:
        """Name a command whose module (``module:attribute``) is imported when it is used."""
        self._lazy[name] = target

    def _load_lazy(self, name: str) -> None:
        target = self._lazy.pop(name, None)
        if target is not None and name not in self.commands:
            import importlib

            module, _, attribute = target.partition(":")
            self.add_command(getattr(importlib.import_module(module), attribute), name)

    def load_plugin_commands(self) -> None:
        """Let every plugin add its commands (once)."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        from emix_core.plugins import get_plugin_manager, hooks_for

        try:
            pm = self._pm or get_plugin_manager(load_builtins=False)
            hooks_for(pm).register_commands(self)
        except EmixError as exc:
            raise click.ClickException(exc.message) from exc

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._load_lazy(cmd_name)
        command = super().get_command(ctx, cmd_name)
        if command is None:
            self.load_plugin_commands()
            command = super().get_command(ctx, cmd_name)
        if command is not None:
            add_common_options(command)
        return command

    def list_commands(self, ctx: click.Context) -> list[str]:
        self.load_plugin_commands()
        return sorted({*super().list_commands(ctx), *self._lazy})


@click.group(cls=EmixCLI, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="emix")
def _root() -> None:
    """emix: share DICOM studies and reports between facilities, through a hub.

    \b
    Quick start:   emix demo
    Send a study:  emix send ./study --to other-facility
    Your inbox:    emix inbox
    Receive one:   emix receive PACKAGE --out ./received
    """


@click.command()
@json_option
@handle_errors
def plugins(as_json: bool) -> None:
    """List loaded plugins, their versions and the hooks each implements."""
    from emix_core.plugins import default_plugin_manager, plugin_info

    rows = plugin_info(default_plugin_manager())
    if as_json:
        emit_json({"plugins": rows})
        return
    for row in rows:
        kind = "built-in" if row["builtin"] else row["distribution"]
        click.echo(f"{row['name']}  ({kind} {row['version']})")
        for hook in row["hooks"]:
            click.echo(f"    {hook}")


def _local_home(home: str | None):  # type: ignore[no-untyped-def]
    from emix_core.client.home import LocalHome
    from emix_core.config import resolve_home

    return LocalHome(resolve_home(home))


@click.command()
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--abort",
    "abort",
    metavar="PACKAGE",
    default=None,
    help="Abort an open (unsealed) package of yours: the hub deletes what was uploaded.",
)
@click.option(
    "--to",
    "to",
    multiple=True,
    help="Recipient facility address or member email (repeat for several).",
)
@click.option(
    "--expires-days",
    type=click.IntRange(1, 3650),
    default=None,
    help="Days the package stays available (default: the hub's, 30).",
)
@hub_option
@token_option
@home_option
@json_option
@handle_errors
def send(
    paths: tuple[Path, ...],
    abort: str | None,
    to: tuple[str, ...],
    expires_days: int | None,
    hub_url: str | None,
    token: str | None,
    home: str | None,
    as_json: bool,
) -> None:
    """Send files and folders (DICOM and reports) as one sealed package.

    DICOM is recognised by content and grouped by study; PDF, RTF, HL7, CDA, FHIR
    and text documents travel with it. Bad files are listed; the rest is sent.
    Exit 0 when everything was sent, 1 when anything failed.

    Interrupted (Ctrl-C, network, hub restart)? Run the same command again: it resumes
    the open package and uploads only what is missing. `--abort PACKAGE` gives it up.
    """
    from emix_core.client.resume import ResumeStore
    from emix_core.client.sender import send_paths

    local = _local_home(home)
    client = local.client(hub_url, token)
    if abort:
        from emix_core.errors import NotFoundError

        try:
            answer = client.abort_package(abort)
        except NotFoundError as exc:
            raise NotFoundError(
                "no open package with that id from your facility (sealed, aborted or "
                "expired already); `emix inbox` and the hub's audit show what happened"
            ) from exc
        ResumeStore(local.path).forget_package(abort)
        if as_json:
            emit_json(answer)
        else:
            click.echo(f"package {abort} aborted; the hub deleted its uploaded items")
        return
    if not paths or not to:
        raise click.UsageError("give PATHS and at least one --to (or --abort PACKAGE)")

    def announce(package_id: str, resumed: bool) -> None:
        if not as_json:
            verb = "resuming" if resumed else "sending"
            click.echo(f"{verb} package {package_id} (interrupted? run the same command "
                       "again to resume)", err=True)  # fmt: skip

    with transfer_progress("sending", not as_json) as progress:
        result = send_paths(
            list(paths),
            list(to),
            client=client,
            home=local,
            expires_days=expires_days,
            parallel=local.config.client.parallel,
            progress=progress,
            on_package=announce,
            resume=True,
        )
    if as_json:
        emit_json(result.to_dict())
    else:
        for failure in result.failed:
            click.secho(f"not sent: {failure.path}: {failure.error}", fg="yellow", err=True)
        if result.package_id:
            mb = result.bytes / 1e6
            click.echo(
                f"package {result.package_id}: {result.items} items, {result.studies} "
                f"studies, {mb:.1f} MB in {result.seconds:.1f} s to {', '.join(to)}"
            )
            for recipient in result.recipients:
                if recipient["to"] != recipient["facility"]:
                    click.echo(f"  {recipient['to']} → {recipient['facility']}")
        else:
            why = "every file failed" if result.failed else "no files found under the given paths"
            click.secho(f"nothing was sent: {why}", fg="red", err=True)
    sys.exit(0 if result.package_id and not result.failed else 1)


@click.command()
@hub_option
@token_option
@home_option
@json_option
@handle_errors
def inbox(hub_url: str | None, token: str | None, home: str | None, as_json: bool) -> None:
    """List the packages waiting for you (or your facility)."""
    client = _local_home(home).client(hub_url, token)
    packages = [{**p, **study_fields(p.get("studies", []))} for p in client.inbox()]
    if as_json:
        emit_json({"packages": packages})
        return
    if not packages:
        click.echo("inbox is empty")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in ("package", "from", "patient", "accession", "date", "modality",
                   "description", "items", "MB", "expires", "state"):  # fmt: skip
        table.add_column(column, no_wrap=column in ("package", "date"), overflow="fold")
    for p in packages:
        table.add_row(
            p["id"],
            p["from"],
            p["patient"],
            p["accession"],
            p["study_date"],
            p["modality"],
            p["description"],
            str(p["items"]),
            f"{p['size'] / 1e6:.1f}",
            p["expires"][:10],
            "received" if p.get("delivered") else "new",
        )
    Console(width=max(160, Console().width)).print(table)


def study_fields(studies: list[dict[str, Any]]) -> dict[str, str]:
    """Patient, accession, study date, modality and description of a package's studies."""

    def joined(values: list[Any]) -> str:
        seen: list[str] = []
        for value in values:
            text = str(value or "").strip()
            if text and text not in seen:
                seen.append(text)
        return ", ".join(seen)

    def date(value: Any) -> str:
        text = str(value or "")
        return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if len(text) == 8 and text.isdigit() else text

    patients = [
        " ".join(x for x in (str(s.get("patient_name") or "").replace("^", " ").strip(),
                             f"({s['patient_id']})" if s.get("patient_id") else "") if x)
        for s in studies
    ]  # fmt: skip
    return {
        "patient": joined(patients),
        "accession": joined([s.get("accession_number") for s in studies]),
        "study_date": joined([date(s.get("study_date")) for s in studies]),
        "modality": joined([m for s in studies for m in s.get("modalities", [])]),
        "description": joined([s.get("study_description") for s in studies]),
    }


@click.command()
@click.argument("package")
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to write the package into (as OUT/PACKAGE/).",
)
@hub_option
@token_option
@home_option
@json_option
@handle_errors
def receive(
    package: str, out: Path, hub_url: str | None, token: str | None, home: str | None, as_json: bool
) -> None:
    """Download a package, verify its signature and every hash, and post a receipt."""
    from emix_core.client.receiver import receive_package

    local = _local_home(home)
    client = local.client(hub_url, token)
    with transfer_progress("receiving", not as_json) as progress:
        received = receive_package(
            package,
            out,
            client=client,
            home=local,
            parallel=local.config.client.parallel,
            progress=progress,
        )
    if as_json:
        emit_json(received.to_dict())
    else:
        click.echo(
            f"received {len(received.items)} items from {received.sender} into "
            f"{received.path} (signature and hashes verified, receipt sent)"
        )


@click.command()
@hub_option
@token_option
@home_option
@json_option
@handle_errors
def facilities(hub_url: str | None, token: str | None, home: str | None, as_json: bool) -> None:
    """List the facilities on your hub: the addresses `emix send --to` accepts."""
    client = _local_home(home).client(hub_url, token)
    rows = client.facilities()
    if as_json:
        emit_json({"facilities": rows})
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("address", "name", "report format", box=None)
    for row in rows:
        table.add_row(row["address"], row["name"], row.get("report_format", ""))
    Console(width=max(100, Console().width)).print(table)


def build_cli(pm: Any = None) -> EmixCLI:
    """A new ``emix`` command group with the core's commands.

    :param pm: the plugin manager whose plugins may add commands (default: a new one,
        made only when a plugin command is needed).
    """
    group = EmixCLI(
        name="emix",
        callback=_root.callback,
        params=[*_root.params, verbose_param(), ca_bundle_param()],
        help=_root.help,
        context_settings=dict(_root.context_settings),
        pm=pm,
    )
    for command in (plugins, facilities, send, inbox, receive):
        group.add_command(command)
    for name, target in CORE_COMMANDS.items():
        group.add_lazy_command(name, target)
    return group


def main() -> None:
    """Entry point of the ``emix`` console script."""
    build_cli()(prog_name="emix")
