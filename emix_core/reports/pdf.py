"""PDF (output only), with fpdf2: the facility's name on every page, the report's
sections, page numbers, and attachments embedded as PDF file attachments.

Unicode names render with DejaVu Sans (Debian ``fonts-dejavu-core``) and, for CJK
characters, Droid Sans Fallback (``fonts-droid-fallback``) when they are installed.
Without them the PDF is still produced with the built-in Helvetica, where characters
outside Latin-1 print as ``?`` (a warning is logged, without the text).
"""

from __future__ import annotations

import logging
import mimetypes
import os
from pathlib import Path

from fpdf import FPDF

from emix_core.reports.model import Report

__all__ = ["FONT_DIRS", "MEDIA_TYPE", "ReportPDF", "find_fonts", "render"]

MEDIA_TYPE = "application/pdf"
PAGES_ALIAS = "{pages}"
log = logging.getLogger(__name__)

#: Where fonts are looked for (Debian/Ubuntu, Fedora, Arch); ``EMIX_FONT_DIR`` first.
FONT_DIRS = (
    "/usr/share/fonts/truetype/dejavu",
    "/usr/share/fonts/dejavu",
    "/usr/share/fonts/TTF",
    "/usr/share/fonts/truetype/droid",
    "/usr/share/fonts/google-droid-sans-fonts",
)
_FONT_FILES = {
    "regular": "DejaVuSans.ttf",
    "bold": "DejaVuSans-Bold.ttf",
    "cjk": "DroidSansFallbackFull.ttf",
}


def find_fonts() -> dict[str, Path]:
    """The font files available here, by role (``regular``, ``bold``, ``cjk``)."""
    dirs = [os.environ["EMIX_FONT_DIR"]] if os.environ.get("EMIX_FONT_DIR") else []
    found: dict[str, Path] = {}
    for role, name in _FONT_FILES.items():
        for folder in [*dirs, *FONT_DIRS]:
            path = Path(folder) / name
            if path.is_file():
                found[role] = path
                break
    return found


class ReportPDF(FPDF):
    """A4 pages with the facility's name on top and "Page n of N" at the bottom."""

    facility = ""
    font_name = "helvetica"

    def header(self) -> None:
        self.set_font(self.font_name, "B", 14)
        self.cell(0, 8, self.safe(self.facility or "Diagnostic Imaging Report"))
        self.ln(9)
        self.set_draw_color(120, 120, 120)
        self.line(self.l_margin, self.get_y(), self.w - self.r_margin, self.get_y())
        self.ln(3)

    def footer(self) -> None:
        self.set_y(-15)
        self.set_font(self.font_name, "", 8)
        self.cell(0, 8, f"Page {self.page_no()} of {PAGES_ALIAS}", align="C")

    def safe(self, value: str) -> str:
        """The text as the current fonts can print it (core fonts know Latin-1 only)."""
        if self.font_name == "helvetica":
            return value.encode("latin-1", "replace").decode("latin-1")
        return value


def render(report: Report) -> bytes:
    """Render the report as a PDF document."""
    pdf = ReportPDF(format="A4")
    fonts = find_fonts()
    if "regular" in fonts and "bold" in fonts:
        pdf.add_font("DejaVu", "", str(fonts["regular"]))
        pdf.add_font("DejaVu", "B", str(fonts["bold"]))
        pdf.font_name = "DejaVu"
        if "cjk" in fonts:
            pdf.add_font("DroidFallback", "", str(fonts["cjk"]))
            pdf.set_fallback_fonts(["DroidFallback"], exact_match=False)
    else:
        log.warning("DejaVu fonts not found: the PDF report uses Helvetica (Latin-1 only)")
    pdf.alias_nb_pages(PAGES_ALIAS)  # room for a four-digit page count
    pdf.facility = report.facility
    pdf.set_title("Diagnostic Imaging Report")
    pdf.set_creator("emix")
    pdf.set_auto_page_break(auto=True, margin=20)
    pdf.add_page()
    t = pdf.safe

    pdf.set_font(pdf.font_name, "B", 16)
    pdf.cell(0, 9, t("Diagnostic Imaging Report"), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font(pdf.font_name, "B", 10)
    status = {"preliminary": "PRELIMINARY - not signed", "amended": "AMENDED", "final": "FINAL"}
    pdf.cell(0, 6, t(f"Status: {status[report.status]}"), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(2)

    patient = report.patient
    rows = [
        ("Patient", patient.name.display()),
        ("Patient ID", f"{patient.id} ({patient.issuer})" if patient.issuer else patient.id),
        ("Birth date", patient.birth_date.isoformat() if patient.birth_date else ""),
        ("Sex", {"M": "male", "F": "female", "O": "other", "U": "unknown"}.get(patient.sex, "")),
        ("Accession number", report.accession_number),
        ("Procedure", report.procedure.display or report.procedure.code),
        ("Performed", report.observation_time.isoformat(" ") if report.observation_time else ""),
        ("Reported", report.report_time.isoformat(" ") if report.report_time else ""),
        ("Study instance UID", report.study_instance_uid),
    ]
    for label, value in rows:
        if value:
            pdf.set_font(pdf.font_name, "B", 10)
            pdf.cell(42, 6, t(label))
            pdf.set_font(pdf.font_name, "", 10)
            pdf.multi_cell(0, 6, t(value), new_x="LMARGIN", new_y="NEXT")

    for heading, text in (("Findings", report.findings), ("Impression", report.impression)):
        if text:
            pdf.ln(4)
            pdf.set_font(pdf.font_name, "B", 12)
            pdf.cell(0, 8, t(heading), new_x="LMARGIN", new_y="NEXT")
            pdf.set_font(pdf.font_name, "", 11)
            pdf.multi_cell(0, 6, t(text), align="L", new_x="LMARGIN", new_y="NEXT")

    if report.author:
        pdf.ln(6)
        pdf.set_font(pdf.font_name, "", 10)
        signer = report.author.name.display() or report.author.id
        pdf.multi_cell(0, 6, t(f"Reported by: {signer}"), new_x="LMARGIN", new_y="NEXT")

    if report.attachments:
        pdf.ln(4)
        pdf.set_font(pdf.font_name, "B", 10)
        pdf.cell(0, 6, t("Attachments (embedded in this PDF)"), new_x="LMARGIN", new_y="NEXT")
        pdf.set_font(pdf.font_name, "", 10)
        for number, attachment in enumerate(report.attachments, start=1):
            extension = mimetypes.guess_extension(attachment.media_type) or ".bin"
            pdf.embed_file(
                bytes=attachment.data,
                basename=f"attachment-{number}{extension}",
                mime_type=attachment.media_type,
            )
            label = attachment.title or f"attachment-{number}{extension}"
            pdf.multi_cell(
                0, 6, t(f"{number}. {label} ({attachment.media_type})"), new_x="LMARGIN",
                new_y="NEXT",
            )  # fmt: skip
    return bytes(pdf.output())
