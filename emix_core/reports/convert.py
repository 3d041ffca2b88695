"""Reading, writing and converting reports through the plugin hooks.

This is the API the rest of emix (and plugins) call; every function takes the plugin
manager, so an installed format plugin is used exactly like a built-in one::

    pm = get_plugin_manager()
    report = parse_report(pm, data)              # format sniffed from the content
    hl7_bytes = render_report(pm, report, "hl7")
    deliver_in_preferred_format(pm, Path("inbox/pkg/documents/0001-report.pdf"), "hl7")
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import pluggy

from emix_core.errors import ConfigError, PayloadTooLarge, ReportFormatError
from emix_core.plugins import hooks_for
from emix_core.reports.model import Attachment, Patient, PersonName, Report, is_valid_uid

__all__ = [
    "FORMATS",
    "MAX_REPORT_BYTES",
    "READABLE_FORMATS",
    "report_formats",
    "ReportFormat",
    "context_from_studies",
    "convert",
    "deliver_in_preferred_format",
    "fill_from",
    "format_for_media_type",
    "parse_report",
    "read_report_file",
    "render_report",
    "sniff_report_format",
]


class ReportFormat(NamedTuple):
    """A report format: its media type, file extension, and whether emix reads it back."""

    media_type: str
    extension: str
    readable: bool = False


#: Built-in formats by name. Plugins may render and read more.
FORMATS: dict[str, ReportFormat] = {
    "hl7": ReportFormat("application/hl7-v2", ".hl7", True),
    "cda": ReportFormat("application/cda+xml", ".xml", True),
    "fhir": ReportFormat("application/fhir+json", ".json", True),
    "pdf": ReportFormat("application/pdf", ".pdf"),
    "rtf": ReportFormat("application/rtf", ".rtf"),
    "txt": ReportFormat("text/plain", ".txt", True),
}
#: Formats emix reads back (PDF and RTF are output only).
READABLE_FORMATS = ("hl7", "cda", "fhir", "txt")
#: Largest report emix reads: bigger is refused with :class:`PayloadTooLarge`.
MAX_REPORT_BYTES = 64 * 1024 * 1024

_ALIASES = {
    "x-application/hl7-v2+er7": "hl7",
    "application/x-hl7": "hl7",
    "application/edi-hl7": "hl7",
    "text/hl7": "hl7",
    "application/hl7-cda+xml": "cda",
    "application/xml": "cda",
    "text/xml": "cda",
    "application/json": "fhir",
    "application/json+fhir": "fhir",
    "text/rtf": "rtf",
    "application/x-rtf": "rtf",
}
#: Declared types too vague to trust when the content says something precise.
_GENERIC = {"text/plain", "application/octet-stream", "application/xml", "text/xml",
            "application/json", ""}  # fmt: skip
_SNIFF_BYTES = 64 * 1024
_CDA_RE = re.compile(rb"<([A-Za-z_][\w.-]*:)?ClinicalDocument[\s>/]")
_WRAPPABLE_TARGETS = ("hl7", "cda", "fhir")


def report_formats(pm: pluggy.PluginManager | None = None) -> dict[str, ReportFormat]:
    """Every report format the loaded plugins provide, by name (the one registry).

    Formats are registered with ``emix_register_report_formats``; the built-in plugin
    registers the six above, and a plugin's format can be a facility's preferred format.
    """
    if pm is None:
        from emix_core.plugins import default_plugin_manager

        pm = default_plugin_manager()
    from emix_core.plugins import hooks_for

    found: dict[str, ReportFormat] = {}

    def register(name: str, media_type: str, extension: str, *, readable: bool = False) -> None:
        if not (isinstance(name, str) and name.isascii() and name.isalnum() and name.islower()):
            raise ConfigError(f"a report format name must be lowercase letters/digits: {name!r}")
        if not extension.startswith(".") or not extension[1:].isalnum():
            raise ConfigError(f"report format {name!r}: extension must look like '.xml'")
        found.setdefault(name, ReportFormat(media_type, extension, readable))

    hooks_for(pm).report_formats(register)
    return found


def format_for_media_type(media_type: str | None) -> str | None:
    """The built-in format name for a media type (parameters ignored), or ``None``."""
    if not media_type:
        return None
    base = media_type.split(";")[0].strip().lower()
    for name, fmt in FORMATS.items():
        if fmt.media_type == base:
            return name
    return _ALIASES.get(base)


def sniff_report_format(data: bytes) -> str | None:
    """The report format of a document, recognised by content (its first 64 KiB).

    Text is recognised only in emix's own text layout; other text gives ``None``
    (declare ``text/plain`` to read it as a report).
    """
    head = data[:_SNIFF_BYTES]
    if head.startswith(b"%PDF-"):
        return "pdf"
    if head.startswith(b"{\\rtf"):
        return "rtf"
    stripped = head.removeprefix(b"\xef\xbb\xbf").removeprefix(b"\x0b").lstrip(b" \t\r\n")
    if stripped.startswith(b"MSH|"):
        return "hl7"
    if stripped.startswith(b"<") and _CDA_RE.search(head):
        return "cda"
    if stripped.startswith(b"{") and b'"resourceType"' in head:
        return "fhir"
    from emix_core.reports.txt import TITLE

    if stripped.startswith(TITLE.encode("ascii")):
        return "txt"
    return None


def parse_report(pm: pluggy.PluginManager, data: bytes, media_type: str | None = None) -> Report:
    """Read a report with the first plugin that understands it.

    :param data: the document.
    :param media_type: its declared type; sniffed from the content when omitted or
        generic (``text/plain`` content that is HL7 is read as HL7).
    :raises PayloadTooLarge: more than :data:`MAX_REPORT_BYTES`.
    :raises ReportFormatError: no plugin reads it, or it is malformed.
    """
    if len(data) > MAX_REPORT_BYTES:
        raise PayloadTooLarge(f"the report is larger than {MAX_REPORT_BYTES // 2**20} MiB")
    declared = (media_type or "").split(";")[0].strip().lower()
    sniffed = sniff_report_format(data)
    if declared in _GENERIC and sniffed:
        effective = FORMATS[sniffed].media_type
    else:
        effective = declared or "application/octet-stream"
    result = hooks_for(pm).parse_report(data, effective)
    if result is None:
        name = format_for_media_type(effective)
        if name in ("pdf", "rtf"):
            raise ReportFormatError(
                f"{name.upper()} reports are output only: emix cannot read one back; "
                "convert from the original HL7, CDA, FHIR or text report"
            )
        declared_note = "" if effective == "application/octet-stream" else f" ({effective[:60]})"
        raise ReportFormatError(
            f"the document{declared_note} is not a report emix can read: HL7 v2 ORU^R01, "
            "CDA R2, FHIR JSON, or emix text (other text is read when declared text/plain)"
        )
    if not isinstance(result, Report):
        raise ReportFormatError("a report plugin returned something that is not a Report")
    return result


def render_report(pm: pluggy.PluginManager, report: Report, fmt: str) -> bytes:
    """Render a report with the first plugin that writes ``fmt``.

    :raises ReportFormatError: no plugin renders that format, or the report cannot be
        expressed in it.
    """
    name = fmt.strip().lower()
    result = hooks_for(pm).render_report(report, name)
    if result is None:
        raise ReportFormatError(
            f"no installed plugin renders reports as {name[:20]!r} (built in: {', '.join(FORMATS)})"
        )
    return bytes(result)


def convert(pm: pluggy.PluginManager, data: bytes, to: str, media_type: str | None = None) -> bytes:
    """Parse a report (format sniffed unless declared) and render it as ``to``."""
    return render_report(pm, parse_report(pm, data, media_type), to)


def read_report_file(path: Path) -> bytes:
    """Read a report file, refusing one larger than :data:`MAX_REPORT_BYTES`."""
    with path.open("rb") as file:
        data = file.read(MAX_REPORT_BYTES + 1)
    if len(data) > MAX_REPORT_BYTES:
        raise PayloadTooLarge(f"the report file is larger than {MAX_REPORT_BYTES // 2**20} MiB")
    return data


# --------------------------------------------------------------------------- delivery


def context_from_studies(
    studies: list[dict[str, Any]], facility: str = "", facility_oid: str = ""
) -> Report | None:
    """What a package's study summary says about the report's subject, as a report.

    Patient name and ID, accession number, study instance UID: only for a package of
    exactly one study (with several, a report's study is not known). ``facility_oid``
    is the receiving facility's, for the identifiers it issues when it writes a report
    that carries none (a PDF made into HL7, say).
    """
    if len(studies) != 1:
        return Report(facility=facility, facility_oid=facility_oid) if facility_oid else None
    study = studies[0]
    uid = str(study.get("study_uid") or "")
    return Report(
        patient=Patient(
            name=PersonName.from_dicom(str(study.get("patient_name") or "")),
            id=str(study.get("patient_id") or ""),
        ),
        accession_number=str(study.get("accession_number") or ""),
        study_instance_uid=uid if is_valid_uid(uid) else "",
        facility=facility,
        facility_oid=facility_oid,
    )


def fill_from(report: Report, context: Report | None) -> Report:
    """The report with its empty links (patient, accession, study, facility) filled in."""
    if context is None:
        return report
    changes: dict[str, Any] = {}
    if not (report.patient.id or report.patient.name) and (
        context.patient.id or context.patient.name
    ):
        changes["patient"] = context.patient
    for name in ("accession_number", "study_instance_uid", "facility", "facility_oid"):
        if not getattr(report, name) and getattr(context, name):
            changes[name] = getattr(context, name)
    return replace(report, **changes) if changes else report


def _source_report(
    pm: pluggy.PluginManager, data: bytes, src: Path, preferred: str
) -> Report | None:
    fmt = sniff_report_format(data[:_SNIFF_BYTES])
    if fmt is None and src.suffix.lower() == ".txt":
        fmt = "txt"  # a legacy RIS's plain-text report
    if fmt is None or fmt == preferred:
        return None
    if fmt in READABLE_FORMATS:
        return parse_report(pm, data, FORMATS[fmt].media_type)
    if preferred not in _WRAPPABLE_TARGETS:
        return None  # a PDF cannot become text or RTF
    # A PDF or RTF cannot be read, but it can travel inside an HL7, CDA or FHIR report.
    title = f"Imaging report ({fmt.upper()})"
    return Report(attachments=[Attachment(FORMATS[fmt].media_type, data, title)])


def deliver_in_preferred_format(
    pm: pluggy.PluginManager,
    src: Path,
    preferred: str,
    *,
    context: Report | None = None,
) -> Path | None:
    """Write a received report's copy in the recipient's preferred format, beside it.

    The original is kept. The copy is ``<stem><extension of preferred>``; an existing
    file is never overwritten: if it already holds that format (a second delivery
    after a crash, or a sender who sent both) it is returned as is, otherwise a
    numbered name is used. A PDF or RTF original travels as an attachment of an HL7,
    CDA or FHIR copy.

    :param context: the package's subject (:func:`context_from_studies`), to fill in
        links a report lacks (a PDF has none that emix can read).
    :return: the copy's path, or ``None`` when ``src`` is not a report or is already
        in the preferred format.
    :raises ReportFormatError: ``src`` looks like a report but is malformed.
    :raises PayloadTooLarge: ``src`` is larger than :data:`MAX_REPORT_BYTES`.
    """
    preferred = preferred.strip().lower()
    with src.open("rb") as file:
        head = file.read(_SNIFF_BYTES)
    if sniff_report_format(head) is None and src.suffix.lower() != ".txt":
        return None  # DICOM, a manifest, an image: not a report
    data = read_report_file(src)
    report = _source_report(pm, data, src, preferred)
    if report is None:
        return None
    output = render_report(pm, fill_from(report, context), preferred)
    formats = report_formats(pm)
    extension = formats[preferred].extension if preferred in formats else f".{preferred}"
    return _write_beside(src, extension, output, preferred)


def _write_beside(src: Path, extension: str, data: bytes, fmt: str) -> Path:
    """Write durably (temp, fsync, link) to the first free ``<stem>[-n]<extension>``."""
    temp = src.with_name(f".emix-report-{secrets.token_hex(6)}.tmp")
    with temp.open("xb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    try:
        for number in range(100):
            suffix = f"-{number}" if number else ""
            target = src.with_name(f"{src.stem}{suffix}{extension}")
            if target.exists():
                with target.open("rb") as existing:
                    if sniff_report_format(existing.read(_SNIFF_BYTES)) == fmt:
                        return target
                continue
            try:
                os.link(temp, target)
            except FileExistsError:
                continue
            _fsync_dir(src.parent)
            return target
        raise ReportFormatError("no free file name for the converted report (100 tried)")
    finally:
        temp.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
