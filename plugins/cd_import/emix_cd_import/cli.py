"""``emix cd inspect``, ``emix cd import`` and ``emix cd export``."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import click

from emix_core import (
    emit_json,
    handle_errors,
    home_option,
    hub_option,
    json_option,
    token_option,
    transfer_progress,
)

__all__ = ["cd"]


@click.group()
def cd() -> None:
    """Read a patient's CD, USB stick, disc image or zip; write a package as a CD image.

    \b
    What is on a disc (a mounted folder, an .iso, a raw image or a .zip):
      emix cd inspect /media/cdrom
    Share it with another facility, or store it into your PACS:
      emix cd import patient-cd.iso --to lakeside
      emix cd import patient-cd.iso --pacs https://pacs/dicom-web --patient-id MRN-0042
    A received package as IHE PDI media, ready to burn:
      emix cd export ./inbox/PACKAGE --iso patient.iso

    Nothing on a medium is ever run: autorun files and viewers are listed, never copied.
    """


def _print_problems(problems: list[dict[str, str]]) -> None:
    for problem in problems:
        where = f" ({problem['where']})" if problem.get("where") else ""
        click.secho(f"problem: {problem['message']}{where}", fg="yellow", err=True)


def _print_catalog(data: dict[str, Any]) -> None:
    counts = data["counts"]
    source = "from its DICOMDIR" if data["dicomdir"] else "by scanning (no DICOMDIR)"
    click.echo(
        f"{data['kind']}: {counts['patients']} patients, {counts['studies']} studies, "
        f"{counts['series']} series, {counts['instances']} instances, read {source}"
    )
    for patient in data["patients"]:
        click.echo(f"  patient {patient['patient_id']} {patient['patient_name']}")
        for study in patient["studies"]:
            click.echo(
                f"    study {study['date'] or '-'} {study['description'] or ''} "
                f"({study['instances']} instances)"
            )
            for series in study["series"]:
                click.echo(
                    f"      series {series['number'] or '-'} {series['modality']} "
                    f"{series['description'] or ''}: {series['instances']}"
                )
    for program in data["programs"]:
        click.echo(f"  not run, not copied: {program}")


@cd.command("inspect")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@json_option
@handle_errors
def inspect_command(source: Path, as_json: bool) -> None:
    """List the patients, studies, series and instances on SOURCE, checking each file,
    with the problems found. Exit 0 when the medium was read, 1 when it could not be."""
    from emix_cd_import.catalog import build_catalog
    from emix_cd_import.media import open_medium

    with open_medium(source) as medium:
        data = build_catalog(medium).to_dict()
    if as_json:
        emit_json(data)
        return
    _print_catalog(data)
    _print_problems(data["problems"])


@cd.command("import")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--to", "to", multiple=True, help="Recipient address (repeat for several).")
@click.option(
    "--pacs", "pacs_url", default=None,
    help="Store into this PACS instead (its DICOMweb base URL).",
)  # fmt: skip
@click.option("--pacs-user", envvar="EMIX_PACS_USER", default="", help="PACS basic auth user.")
@click.option(
    "--pacs-password", envvar="EMIX_PACS_PASSWORD", default="",
    help="PACS basic auth password (prefer env EMIX_PACS_PASSWORD).",
)  # fmt: skip
@click.option(
    "--patient-id", default=None,
    help="The local patient id to import under; the foreign id is kept in "
    "Other Patient IDs Sequence.",
)  # fmt: skip
@hub_option
@token_option
@home_option
@json_option
@handle_errors
def import_command(
    source: Path,
    to: tuple[str, ...],
    pacs_url: str | None,
    pacs_user: str,
    pacs_password: str,
    patient_id: str | None,
    hub_url: str | None,
    token: str | None,
    home: str | None,
    as_json: bool,
) -> None:
    """Check every file on SOURCE, reconcile the patient, and send the studies to a
    facility (--to) or store them into a PACS (--pacs). Bad files are reported and the
    good studies still imported. Exit 0 when everything was imported, 1 otherwise."""
    from emix_cd_import.dicomweb import pacs_settings
    from emix_cd_import.importer import import_medium
    from emix_core import LocalHome, resolve_home

    if bool(to) == bool(pacs_url):
        raise click.UsageError("give either --to ADDRESS or --pacs URL")
    if patient_id is not None and not re.fullmatch(r"[^\\\x00-\x1f]{1,64}", patient_id.strip()):
        raise click.UsageError(
            "--patient-id must be 1 to 64 characters, without backslash or control characters"
        )
    patient_id = patient_id.strip() if patient_id else None
    local = LocalHome(resolve_home(home))
    client = local.client(hub_url, token) if to else None
    pacs = pacs_settings(pacs_url, username=pacs_user, password=pacs_password) if pacs_url else None
    work_dir = local.path / "tmp"  # staged copies stay in the facility's own home
    work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with transfer_progress("importing", not as_json) as progress:
        result = import_medium(
            source,
            home=local,
            to=list(to),
            client=client,
            pacs=pacs,
            local_patient_id=patient_id,
            work_dir=work_dir,
            parallel=local.config.client.parallel,
            progress=progress,
        )
    data = result.to_dict()
    if as_json:
        emit_json(data)
    else:
        _print_problems(data["problems"])
        where = f"package {result.package_id}" if result.package_id else "the PACS"
        click.echo(
            f"{result.imported} of {data['counts']['instances']} instances imported into "
            f"{where}; {result.reconciled} reconciled to the local patient"
            if result.imported
            else "nothing was imported"
        )
    sys.exit(0 if result.complete else 1)


@cd.command("export")
@click.argument("package")
@click.option("--iso", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write an ISO 9660 disc image here.")  # fmt: skip
@click.option("--folder", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the disc's content into this (new or empty) folder.")  # fmt: skip
@hub_option
@token_option
@home_option
@json_option
@handle_errors
def export_command(
    package: str,
    iso: Path | None,
    folder: Path | None,
    hub_url: str | None,
    token: str | None,
    home: str | None,
    as_json: bool,
) -> None:
    """Write PACKAGE as IHE PDI media: a DICOMDIR, the images under DICOM/, INDEX.HTM and
    README.TXT; as an ISO image ready to burn, or a folder.

    PACKAGE is a received package's folder, or a package id in your inbox (it is then
    received, verified, written as media, and the downloaded copy removed)."""
    from emix_cd_import.export import export_inbox_package, export_package
    from emix_core import PACKAGE_ID_RE, LocalHome, resolve_home

    if (iso is None) == (folder is None):
        raise click.UsageError("give either --iso OUT.iso or --folder OUT")
    if Path(package).is_dir():
        data = export_package(Path(package), iso=iso, out=folder)
    elif PACKAGE_ID_RE.fullmatch(package):
        local = LocalHome(resolve_home(home))
        with transfer_progress("receiving", not as_json) as progress:
            data = export_inbox_package(
                package,
                client=local.client(hub_url, token),
                home=local,
                iso=iso,
                out=folder,
                progress=progress,
            )
    else:
        raise click.UsageError("PACKAGE must be a received package's folder or a package id")
    if as_json:
        emit_json(data)
    else:
        click.echo(
            f"{data['path']}: {data['instances']} instances, {data['documents']} documents, "
            f"{data['bytes'] / 1e6:.1f} MB"
        )
