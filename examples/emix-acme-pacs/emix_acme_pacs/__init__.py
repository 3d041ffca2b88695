"""Example emix adapter: deliver arrived studies into an ACME PACS import folder.

Only the public API is used: ``emix_core`` for the hooks, the model and the helpers.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import click

from emix_core import (
    DICOM_MEDIA_TYPE,
    ConfigError,
    Package,
    emit_json,
    handle_errors,
    hookimpl,
    item_relative_path,
    json_option,
)

__version__ = "0.1.0"
KIND = "acme-pacs"


class AcmeImportFolder:
    """A gateway destination: copy each DICOM instance into ACME's import folder.

    :param settings: the ``[[destinations]]`` table (``import_folder`` is required).
    """

    def __init__(self, settings: dict[str, Any], gateway: Any = None) -> None:
        self.name = str(settings.get("name", KIND))
        folder = settings.get("import_folder")
        if not isinstance(folder, str) or not folder:
            raise ConfigError(f'destination {self.name!r} needs import_folder = "/path"')
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConfigError(
                f"destination {self.name!r}: import folder {self.folder} does not exist "
                "(is the PACS share mounted?)"
            )

    def deliver(self, package: Package, path: Path) -> dict[str, Any]:
        """Copy every DICOM instance; skip the ones a previous delivery already copied."""
        copied = skipped = 0
        for item in package.items:
            if item.media_type != DICOM_MEDIA_TYPE:
                continue
            # ACME wants opaque names: never a UID or a patient detail in a file name.
            name = hashlib.sha256(f"{package.id}/{item.id}".encode()).hexdigest()[:32] + ".dcm"
            target = self.folder / name
            if target.exists() and target.stat().st_size == item.size:
                skipped += 1
                continue
            temp = self.folder / f".{name}.part"
            with (path / item_relative_path(item)).open("rb") as src, temp.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1024 * 1024)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(temp, target)  # ACME ignores dot-files: it sees only whole files
            copied += 1
        return {"copied": copied, "already_there": skipped}


@hookimpl
def emix_register_destinations(register: Any) -> None:
    register(KIND, AcmeImportFolder)


@click.group("acme-pacs")
def acme_pacs() -> None:
    """The ACME PACS import folder (example adapter)."""


@acme_pacs.command("pending")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@json_option
@handle_errors
def pending(folder: Path, as_json: bool) -> None:
    """How many instances wait in FOLDER for ACME to import them."""
    count = sum(1 for p in folder.iterdir() if p.suffix == ".dcm" and not p.name.startswith("."))
    if as_json:
        emit_json({"folder": str(folder), "pending": count})
    else:
        click.echo(f"{count} instances wait for import in {folder}")


@hookimpl
def emix_register_commands(cli: click.Group) -> None:
    cli.add_command(acme_pacs)
