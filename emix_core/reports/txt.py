"""Plain text (UTF-8): readable by a person, and read back by emix.

Layout: a title line, ``Label: value`` header lines, a blank line, then ``FINDINGS:``
and ``IMPRESSION:`` each followed by its text indented by two spaces (so no line of
the text can be mistaken for a heading). Names are written as DICOM writes them
(``Family^Given^Middle^Prefix^Suffix``). Attachments are listed, not included.

Any other UTF-8 text (a report from a legacy RIS) reads as a report whose findings
are the whole text: nothing is lost, nothing is guessed.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime
from typing import TypeVar

from emix_core.errors import ReportFormatError
from emix_core.reports.model import Author, Code, Patient, PersonName, Report

__all__ = ["MEDIA_TYPE", "TITLE", "parse", "render"]

MEDIA_TYPE = "text/plain"
TITLE = "DIAGNOSTIC IMAGING REPORT"
_INDENT = "  "
T = TypeVar("T")
_SECTIONS = {"FINDINGS:": "findings", "IMPRESSION:": "impression"}


def _header(report: Report) -> list[tuple[str, str]]:
    patient, author = report.patient, report.author
    return [
        ("Facility", report.facility),
        ("Status", report.status),
        ("Patient name", patient.name.to_dicom()),
        ("Patient ID", patient.id),
        ("Issuer of patient ID", patient.issuer),
        ("Birth date", patient.birth_date.isoformat() if patient.birth_date else ""),
        ("Sex", patient.sex),
        ("Accession number", report.accession_number),
        ("Study instance UID", report.study_instance_uid),
        ("Procedure", report.procedure.display),
        ("Procedure code", report.procedure.code),
        ("Procedure code system", report.procedure.system),
        ("Author", author.name.to_dicom() if author else ""),
        ("Author ID", author.id if author else ""),
        ("Observed", report.observation_time.isoformat() if report.observation_time else ""),
        ("Reported", report.report_time.isoformat() if report.report_time else ""),
    ]


def render(report: Report) -> bytes:
    """Render the report as UTF-8 text with LF line ends."""
    lines = [TITLE, ""]
    lines += [f"{label}: {value}" for label, value in _header(report) if value]
    for attachment in report.attachments:
        title = attachment.title or "untitled"
        lines.append(
            f"Attachment: {title} ({attachment.media_type}, {len(attachment.data)} bytes, "
            "not included in this text)"
        )
    for heading, text in (("FINDINGS:", report.findings), ("IMPRESSION:", report.impression)):
        if text:
            lines += ["", heading]
            lines += [_INDENT + line if line else "" for line in text.split("\n")]
    return ("\n".join(lines) + "\n").encode("utf-8")


def parse(data: bytes) -> Report:
    """Read emix's text layout, or any UTF-8 text as the findings of a report.

    :raises ReportFormatError: not UTF-8 text.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ReportFormatError("the text report is not UTF-8") from None
    if "\x00" in text:
        raise ReportFormatError("the text report holds NUL characters: it is not text")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if not lines or lines[0].strip() != TITLE:
        return Report(status="final", findings=text)

    fields: dict[str, str] = {}
    sections: dict[str, list[str]] = {"findings": [], "impression": []}
    current: list[str] | None = None
    for line in lines[1:]:
        if line in _SECTIONS:
            current = sections[_SECTIONS[line]]
        elif current is not None:
            current.append(line[len(_INDENT) :] if line.startswith(_INDENT) else line.strip())
        elif ": " in line:
            label, _, value = line.partition(": ")
            fields.setdefault(label.strip(), value.strip())

    def time(label: str) -> datetime | None:
        return _iso(fields.get(label, ""), datetime.fromisoformat)

    author = Author(
        name=PersonName.from_dicom(fields.get("Author", "")), id=fields.get("Author ID", "")
    )
    return Report(
        patient=Patient(
            name=PersonName.from_dicom(fields.get("Patient name", "")),
            id=fields.get("Patient ID", ""),
            issuer=fields.get("Issuer of patient ID", ""),
            birth_date=_iso(fields.get("Birth date", ""), date.fromisoformat),
            sex=fields.get("Sex", ""),
        ),
        accession_number=fields.get("Accession number", ""),
        study_instance_uid=fields.get("Study instance UID", ""),
        procedure=Code(
            code=fields.get("Procedure code", ""),
            display=fields.get("Procedure", ""),
            system=fields.get("Procedure code system", ""),
        ),
        author=author,
        status=fields.get("Status", "final"),
        findings="\n".join(sections["findings"]),
        impression="\n".join(sections["impression"]),
        observation_time=time("Observed"),
        report_time=time("Reported"),
        facility=fields.get("Facility", ""),
    )


def _iso(value: str, convert: Callable[[str], T]) -> T | None:
    if not value:
        return None
    try:
        return convert(value)
    except ValueError:
        raise ReportFormatError("a date in the text report is not ISO 8601") from None
