"""``emix report``: report commands (``emix report convert FILE --to FORMAT``)."""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import click

from emix_core.cli.util import emit_json, handle_errors, json_option
from emix_core.reports.convert import FORMATS
from emix_core.reports.model import Report

__all__ = ["report"]

_BINARY_FORMATS = {"pdf"}


@click.group()
def report() -> None:
    """Convert reports between HL7 v2, CDA, FHIR, PDF, RTF and text."""


@report.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--to",
    "to",
    required=True,
    metavar="|".join(FORMATS),
    help="Target format (plugins may add more).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    help="Write here instead of standard output (needed for PDF on a terminal).",
)
@click.option(
    "--from",
    "media_type",
    default=None,
    metavar="MEDIA_TYPE",
    help="Declare the input's media type (default: recognised from the content).",
)
@json_option
@handle_errors
def convert(file: Path, to: str, out: Path | None, media_type: str | None, as_json: bool) -> None:
    """Convert one report FILE to another format.

    \b
    The input's format is recognised from its content (HL7 v2, CDA, FHIR JSON, emix
    text); PDF and RTF are output only. Text formats go to standard output unless
    --out is given. Identifiers the report lacks are issued under the home's
    [identifiers] facility_oid (EMIX_FACILITY_OID).
    """
    from emix_core.plugins import default_plugin_manager
    from emix_core.reports.convert import (
        parse_report,
        read_report_file,
        render_report,
        report_formats,
    )

    fmt = to.strip().lower()
    pm = default_plugin_manager()
    if as_json and out is None:
        raise click.UsageError("--json needs --out FILE (the report itself is not JSON output)")
    stdout = sys.stdout.buffer
    if out is None and fmt in _BINARY_FORMATS and stdout.isatty():
        raise click.UsageError(
            f"{fmt.upper()} is binary: refusing to write it to a terminal; use --out FILE "
            "or redirect standard output"
        )
    formats = report_formats(pm)
    if fmt not in formats:
        raise click.BadParameter(f"must be one of {', '.join(formats)}", param_hint="--to")
    document = parse_report(pm, read_report_file(file), media_type)
    document = _with_facility_oid(document)
    data = render_report(pm, document, fmt)
    if out is None:
        stdout.write(data)
        stdout.flush()
        return
    _write_atomically(out, data)
    if as_json:
        media = formats[fmt].media_type
        emit_json({"out": str(out), "format": fmt, "media_type": media, "bytes": len(data)})
    else:
        click.echo(f"wrote {out} ({fmt}, {len(data)} bytes)", err=True)


def _with_facility_oid(document: Report) -> Report:
    """A report carrying no facility OID is issued under the home's ``facility_oid``."""
    from emix_core.config import load_config
    from emix_core.reports.convert import fill_from

    oid = load_config().identifiers.facility_oid
    return fill_from(document, Report(facility_oid=oid)) if oid else document


def _write_atomically(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with temp.open("xb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
