"""Synthetic studies and reports for the demo, the tests and the benchmarks.

The generated CT study looks like a real one to every DICOM tool (CT Image Storage,
explicit VR little endian, Part 10 files with a preamble, the usual geometry and display
attributes) but its pixels are random noise: compression cannot shrink it, so transfer
measurements are honest, and it contains no real patient. Slices are written one at a
time, so memory stays flat whatever the size of the study.
"""

from __future__ import annotations

import importlib.util
import os
import random
import unicodedata
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

from emix_core.errors import InvalidInput

__all__ = ["generate_study", "write_sample_report_pdf", "write_sample_report_txt"]

PIXEL_SPACING_MM = 0.488
SERIES_KINDS = [
    ("AXIAL 5.0 SOFT TISSUE", 5.0, 40, 400),
    ("AXIAL 1.25 BONE", 1.25, 500, 2000),
    ("AXIAL 2.5 BRAIN", 2.5, 40, 80),
    ("AXIAL 3.0 LUNG", 3.0, -600, 1500),
]
#: A date used when a seed is given, so that the same seed gives the same files.
SEEDED_DATETIME = datetime(2025, 1, 15, 9, 30, 0)
FONT_CANDIDATES = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/noto/NotoSans-Regular.ttf",
    "/usr/local/share/fonts/DejaVuSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial Unicode.ttf",
    "/Library/Fonts/Arial Unicode.ttf",
    "C:/Windows/Fonts/arial.ttf",
]
#: Letters with no Latin-1 form and no decomposition, for the core-font fallback.
TRANSLITERATIONS = str.maketrans(
    {
        "Ł": "L",
        "ł": "l",
        "Đ": "D",
        "đ": "d",
        "Ħ": "H",
        "ħ": "h",
        "ı": "i",
        "Œ": "OE",
        "œ": "oe",
        "‘": "'",
        "’": "'",
        "“": '"',
        "”": '"',
        "–": "-",
        "—": "-",
        "…": "...",
        "€": "EUR",
    }
)


def generate_study(
    out_dir: Path,
    *,
    slices: int = 200,
    series: int = 2,
    rows: int = 512,
    columns: int = 512,
    patient_name: str = "DEMO^PATIENT",
    patient_id: str = "DEMO-0001",
    accession_number: str = "A0001",
    study_uid: str | None = None,
    seed: int | None = None,
    uid_root: str | None = None,
) -> list[Path]:
    """Write a synthetic CT study of ``slices`` instances spread over ``series`` series.

    Files are named ``series-01/slice-0001.dcm`` under ``out_dir``. Pixels are 16-bit
    signed noise; with a ``seed`` the pixels, UIDs and dates are reproducible. UIDs
    are made under ``uid_root`` (default: the configured ``[identifiers] uid_root``, else
    UUID-derived).

    :returns: the paths written, series by series, in slice order.
    :raises InvalidInput: a count or a dimension below 1.
    """
    if min(slices, series, rows, columns) < 1:
        raise InvalidInput("slices, series, rows and columns must each be at least 1")
    series = min(series, slices)
    rng = random.Random(seed)
    noise: Callable[[int], bytes] = os.urandom if seed is None else rng.randbytes
    uid = _uid_source(seed, uid_root)
    when = SEEDED_DATETIME if seed is not None else datetime.now().replace(microsecond=0)
    study = _study_dataset(
        study_uid or uid("study"), patient_name, patient_id, accession_number, when
    )
    frame_of_reference = uid("frame-of-reference")
    out_dir = Path(out_dir)
    written: list[Path] = []
    for index in range(series):
        count = slices // series + (1 if index < slices % series else 0)
        folder = out_dir / f"series-{index + 1:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        ds = _series_dataset(study, index, rows, columns, uid(f"series-{index}"))
        ds.FrameOfReferenceUID = frame_of_reference
        thickness = float(ds.SliceThickness)
        x0, y0 = _f(-columns * PIXEL_SPACING_MM / 2), _f(-rows * PIXEL_SPACING_MM / 2)
        for number in range(1, count + 1):
            sop_uid = uid(f"instance-{index}-{number}")
            z = round(-(number - 1) * thickness, 3)
            ds.SOPInstanceUID = sop_uid
            ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
            ds.InstanceNumber = number
            ds.ImagePositionPatient = [x0, y0, z]
            ds.SliceLocation = z
            ds.PixelData = noise(rows * columns * 2)
            path = folder / f"slice-{number:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            written.append(path)
    return written


def _uid_source(seed: int | None, root: str | None) -> Callable[[str], str]:
    from emix_core.content.uids import new_uid, uid_root

    prefix = uid_root(root)
    if seed is None:
        return lambda _purpose: new_uid(prefix)
    return lambda purpose: new_uid(prefix, entropy=["emix-sample", str(seed), purpose])


def _f(value: float) -> float:
    return round(value, 3)


def _study_dataset(
    study_uid: str, patient_name: str, patient_id: str, accession_number: str, when: datetime
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8, so any patient name can be written
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = when.strftime("%H%M%S")
    ds.AccessionNumber = accession_number
    ds.Modality = "CT"
    ds.Manufacturer = "emix synthetic"
    ds.InstitutionName = "emix demo"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT HEAD WITHOUT CONTRAST"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "HEAD"
    ds.KVP = "120"
    ds.StudyInstanceUID = study_uid
    ds.StudyID = "1"
    ds.AcquisitionNumber = 1
    ds.PatientPosition = "HFS"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def _series_dataset(
    study: Dataset, index: int, rows: int, columns: int, series_uid: str
) -> Dataset:
    description, thickness, center, width = SERIES_KINDS[index % len(SERIES_KINDS)]
    ds = Dataset()
    ds.update(study)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.preamble = b"\0" * 128
    ds.SeriesDescription = description
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = index + 1
    ds.SliceThickness = str(thickness)
    ds.SpacingBetweenSlices = str(thickness)
    ds.Rows = rows
    ds.Columns = columns
    ds.PixelSpacing = [PIXEL_SPACING_MM, PIXEL_SPACING_MM]
    ds.WindowCenter = str(center)
    ds.WindowWidth = str(width)
    return ds


# -- reports ----------------------------------------------------------------------------


def write_sample_report_pdf(
    path: Path,
    *,
    facility: str,
    accession_number: str,
    patient_name: str,
    findings: str,
    impression: str,
) -> Path:
    """Write a one-page radiology report as PDF (fpdf2).

    A Unicode TrueType font is used when one is found on this machine; otherwise the
    PDF core font is used and text outside Latin-1 is transliterated.
    """
    from fpdf import FPDF

    pdf = FPDF(format="A4")
    pdf.set_creator("emix")
    pdf.set_title("Radiology report")
    font = unicode_font()
    if font is not None:
        pdf.add_font("report", "", str(font))
        family, clean = "report", _printable
    else:
        family, clean = "Helvetica", _latin1
    pdf.add_page()

    def line(text: str, size: int, gap: float = 2) -> None:
        pdf.set_font(family, size=size)
        pdf.multi_cell(0, size * 0.5, clean(text), align="L", new_x="LMARGIN", new_y="NEXT")
        pdf.ln(gap)

    line(facility, 16)
    line("Radiology report", 13, 6)
    for label, value in _report_fields(accession_number, patient_name):
        line(f"{label}: {value}", 11, 1)
    pdf.ln(4)
    line("Findings", 13)
    line(findings, 11, 6)
    line("Impression", 13)
    line(impression, 11, 10)
    line("Synthetic sample generated by emix for demonstration: not a real patient.", 8)
    path = Path(path)
    pdf.output(str(path))
    return path


def write_sample_report_txt(
    path: Path,
    *,
    facility: str,
    accession_number: str,
    patient_name: str,
    findings: str,
    impression: str,
) -> Path:
    """Write the same report as :func:`write_sample_report_pdf` as UTF-8 plain text."""
    fields = "\n".join(
        f"{label}: {value}" for label, value in _report_fields(accession_number, patient_name)
    )
    text = (
        f"{facility}\nRADIOLOGY REPORT\n\n{fields}\n\n"
        f"FINDINGS\n{findings}\n\nIMPRESSION\n{impression}\n\n"
        "Synthetic sample generated by emix for demonstration: not a real patient.\n"
    )
    path = Path(path)
    path.write_text(text, encoding="utf-8")
    return path


def unicode_font() -> Path | None:
    """A TrueType font covering more than Latin-1 (DejaVu Sans or similar), if installed."""
    candidates = [Path(p) for p in FONT_CANDIDATES]
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "mpl-data/fonts/ttf/DejaVuSans.ttf")
    return next((p for p in candidates if p.is_file()), None)


def _report_fields(accession_number: str, patient_name: str) -> list[tuple[str, str]]:
    return [
        ("Patient", _display_name(patient_name)),
        ("Accession number", accession_number),
        ("Report date", date.today().isoformat()),
    ]


def _display_name(dicom_name: str) -> str:
    """``FAMILY^GIVEN^MIDDLE`` as ``FAMILY, GIVEN MIDDLE``."""
    family, _, rest = dicom_name.partition("^")
    given = " ".join(part for part in rest.split("^")[:2] if part)
    return f"{family}, {given}" if given else family


def _printable(text: str) -> str:
    return "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")


def _latin1(text: str) -> str:
    """Text the PDF core fonts can show: Latin-1 kept, accents dropped, others ``?``."""
    out = []
    for ch in _printable(text).translate(TRANSLITERATIONS):
        if ord(ch) < 256:
            out.append(ch)
            continue
        base = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
        out.append(base if base and all(ord(c) < 256 for c in base) else "?")
    return "".join(out)
