"""Rich Text Format (output only): opens in every word processor and many EMRs.

The file is 7-bit ASCII: ``\\ { }`` are escaped, every non-ASCII character is a
``\\uN?`` escape (UTF-16 code units, signed, with ``?`` as the fallback), so names
like Müller or 山田 survive whatever code page the reader assumes.
"""

from __future__ import annotations

from emix_core.reports.model import Report

__all__ = ["MEDIA_TYPE", "escape", "render"]

MEDIA_TYPE = "application/rtf"

_HEADER = (
    "{\\rtf1\\ansi\\ansicpg1252\\deff0\\uc1"
    "{\\fonttbl{\\f0\\fswiss\\fcharset0 Arial;}}"
    "{\\info{\\title Diagnostic Imaging Report}{\\author emix}}"
    "\\paperw11906\\paperh16838\\margl1134\\margr1134\\margt1134\\margb1134"
    "\\f0\\fs22\n"
)


def escape(text: str) -> str:
    """Escape text for an RTF body: specials, line ends, tabs and non-ASCII."""
    out: list[str] = []
    for char in text:
        code = ord(char)
        if char in "\\{}":
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\line\n")
        elif char == "\t":
            out.append("\\tab ")
        elif code < 0x20:
            continue
        elif code < 0x80:
            out.append(char)
        else:
            units = char.encode("utf-16-le")
            for i in range(0, len(units), 2):
                unit = int.from_bytes(units[i : i + 2], "little", signed=True)
                out.append(f"\\u{unit}?")
    return "".join(out)


def _paragraph(text: str, *, bold: bool = False, size: int = 22) -> str:
    style = ("\\b" if bold else "") + f"\\fs{size} "
    return f"{{\\pard\\sa120{style}{escape(text)}\\par}}\n"


def render(report: Report) -> bytes:
    """Render an RTF document (ASCII bytes)."""
    patient = report.patient
    parts = [_HEADER]
    if report.facility:
        parts.append(_paragraph(report.facility, bold=True, size=32))
    parts.append(_paragraph("Diagnostic Imaging Report", bold=True, size=28))
    parts.append(_paragraph(f"Status: {report.status.upper()}", bold=True))
    details = [
        ("Patient", patient.name.display()),
        ("Patient ID", f"{patient.id} ({patient.issuer})" if patient.issuer else patient.id),
        ("Birth date", patient.birth_date.isoformat() if patient.birth_date else ""),
        ("Sex", patient.sex),
        ("Accession number", report.accession_number),
        ("Study instance UID", report.study_instance_uid),
        ("Procedure", report.procedure.display or report.procedure.code),
        ("Performed", report.observation_time.isoformat(" ") if report.observation_time else ""),
        ("Reported", report.report_time.isoformat(" ") if report.report_time else ""),
    ]
    for label, value in details:
        if value:
            parts.append(f"{{\\pard\\b {escape(label)}:\\b0  {escape(value)}\\par}}\n")
    for heading, text in (("Findings", report.findings), ("Impression", report.impression)):
        if text:
            parts.append(_paragraph(heading, bold=True, size=26))
            parts.append(_paragraph(text))
    if report.author:
        signer = report.author.name.display() or report.author.id
        parts.append(_paragraph(f"Reported by: {signer}"))
    for attachment in report.attachments:
        title = attachment.title or attachment.media_type
        parts.append(_paragraph(f"Attachment (not included): {title}"))
    parts.append("}\n")
    return "".join(parts).encode("ascii")
