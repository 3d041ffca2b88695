"""``emix viewer``: install the OHIF viewer that the hub serves at ``/viewer/``."""

from __future__ import annotations

from pathlib import Path

import click

from emix_core.cli.util import emit_json, handle_errors, home_option, json_option
from emix_core.config import resolve_home


@click.group()
def viewer() -> None:
    """The browser's image viewer (OHIF Viewer 3, served by the hub)."""


@viewer.command("install")
@home_option
@click.option(
    "--dir",
    "target",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Install here instead of HOME/viewer (the hub reads EMIX_VIEWER_DIR then).",
)
@click.option("--version", "version", default=None, help="@ohif/app version (tested: default).")
@json_option
@handle_errors
def viewer_install(
    home: str | None, target: Path | None, version: str | None, as_json: bool
) -> None:
    """Fetch @ohif/app with `npm pack` (cached) and prepare it for the hub's /viewer/.

    Needs npm and the npm registry once; the tarball is kept in ~/.cache/emix, so a
    second install works offline. Restarting the hub is not needed.
    """
    from emix_core.hub import viewer as ohif

    folder = target.resolve() if target else ohif.viewer_dir(resolve_home(home))
    result = ohif.install(folder, version or ohif.OHIF_VERSION)
    if as_json:
        emit_json(result)
    else:
        click.echo(f"{result['viewer']} installed in {result['path']} ({result['files']} files)")
        click.echo("signed-in members now get 'Open in viewer' on each study")


@viewer.command("status")
@home_option
@json_option
@handle_errors
def viewer_status(home: str | None, as_json: bool) -> None:
    """Say whether the viewer is installed, and where."""
    from emix_core.hub import viewer as ohif

    folder = ohif.viewer_dir(resolve_home(home))
    version_file = folder / "VERSION"
    info = {
        "installed": ohif.installed(resolve_home(home)),
        "path": str(folder / "dist"),
        "viewer": version_file.read_text().strip() if version_file.exists() else None,
    }
    if as_json:
        emit_json(info)
    elif info["installed"]:
        click.echo(f"{info['viewer']} installed in {info['path']}")
    else:
        click.echo("the viewer is not installed; run: emix viewer install")
