"""The synthetic study and reports used by the demo, the tests and the benchmarks."""

from __future__ import annotations

import tracemalloc
import zlib
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pypdf import PdfReader

from emix_core.content import samples
from emix_core.content.documents import classify, sniff_document
from emix_core.content.samples import (
    generate_study,
    write_sample_report_pdf,
    write_sample_report_txt,
)

REPORT = {
    "facility": "Mercy General",
    "accession_number": "ACC-99120",
    "patient_name": "MÜLLER^ŁUCJA",
    "findings": "No acute intracranial abnormality. " * 12,
    "impression": "Normal CT of the head.",
}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("study")
    return generate_study(
        folder,
        slices=20,
        series=3,
        patient_name="MUSTERMANN^ERIKA",
        patient_id="PID-7734-XQ",
        accession_number="ACC-99120",
    )


def test_generated_study_has_every_slice_spread_over_its_series(study: list[Path]) -> None:
    assert len(study) == 20
    assert all(p.is_file() for p in study)
    assert [p.relative_to(study[0].parent.parent).as_posix() for p in study[:2]] == [
        "series-01/slice-0001.dcm",
        "series-01/slice-0002.dcm",
    ]
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in study]
    assert len({ds.StudyInstanceUID for ds in headers}) == 1
    per_series = Counter(ds.SeriesInstanceUID for ds in headers)
    assert sorted(per_series.values()) == [6, 7, 7]
    assert len({ds.SOPInstanceUID for ds in headers}) == 20
    for ds in headers:
        assert ds.SOPClassUID == CTImageStorage
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.Modality == "CT"
        assert ds.PatientName == "MUSTERMANN^ERIKA"
        assert ds.PatientID == "PID-7734-XQ"
        assert ds.AccessionNumber == "ACC-99120"
        for keyword in (
            "ImagePositionPatient",
            "SliceThickness",
            "WindowCenter",
            "WindowWidth",
            "RescaleSlope",
            "RescaleIntercept",
            "PixelSpacing",
            "StudyDate",
            "StudyDescription",
            "SeriesDescription",
        ):
            assert keyword in ds, keyword
    first_series = [ds for ds in headers if ds.SeriesNumber == 1]
    assert [ds.InstanceNumber for ds in first_series] == list(range(1, 8))
    positions = [float(ds.ImagePositionPatient[2]) for ds in first_series]
    assert positions == sorted(positions, reverse=True) and len(set(positions)) == 7


def test_generated_slices_are_part10_files_with_512x512_signed_pixels(study: list[Path]) -> None:
    data = study[0].read_bytes()
    assert data[128:132] == b"DICM"
    ds = pydicom.dcmread(study[0])
    assert ds.pixel_array.shape == (512, 512)
    assert ds.pixel_array.dtype.name == "int16"


def test_generated_pixels_are_noise_that_compression_cannot_shrink(study: list[Path]) -> None:
    pixels = pydicom.dcmread(study[-1]).PixelData
    assert len(zlib.compress(pixels)) > 0.98 * len(pixels)
    assert pydicom.dcmread(study[0]).PixelData != pixels


def test_every_generated_slice_is_classified_as_dicom_of_one_study(study: list[Path]) -> None:
    instances = [classify(p)[1] for p in study]
    assert all(i is not None for i in instances)
    assert len({i.study_uid for i in instances if i}) == 1
    assert {i.series_number for i in instances if i} == {1, 2, 3}


def test_a_seed_reproduces_the_study_byte_for_byte(tmp_path: Path) -> None:
    first = generate_study(tmp_path / "a", slices=3, series=2, rows=16, columns=16, seed=42)
    again = generate_study(tmp_path / "b", slices=3, series=2, rows=16, columns=16, seed=42)
    other = generate_study(tmp_path / "c", slices=3, series=2, rows=16, columns=16, seed=43)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    assert first[0].read_bytes() != other[0].read_bytes()


def test_a_given_study_uid_is_used(tmp_path: Path) -> None:
    uid = "1.2.826.0.1.3680043.8.498.1234"
    (path,) = generate_study(tmp_path, slices=1, series=1, rows=8, columns=8, study_uid=uid)
    assert pydicom.dcmread(path).StudyInstanceUID == uid


def test_generation_memory_stays_flat_one_slice_at_a_time(tmp_path: Path) -> None:
    generate_study(tmp_path / "warm", slices=1, series=1, rows=8, columns=8)
    tracemalloc.start()
    try:
        generate_study(tmp_path / "s", slices=12, series=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = 12 * 512 * 512 * 2
    assert peak < total / 3, f"peak {peak} bytes for a {total}-byte study"


def test_sample_pdf_report_is_a_pdf_with_the_report_in_it(tmp_path: Path) -> None:
    path = write_sample_report_pdf(tmp_path / "report.pdf", **REPORT)
    assert sniff_document(path) == "application/pdf"
    text = " ".join(PdfReader(path).pages[0].extract_text().split())
    for expected in ("Mercy General", "ACC-99120", "No acute intracranial", "Normal CT"):
        assert expected in text
    if samples.unicode_font() is not None:
        assert "MÜLLER, ŁUCJA" in text


def test_sample_pdf_without_a_unicode_font_transliterates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(samples, "unicode_font", lambda: None)
    path = write_sample_report_pdf(tmp_path / "report.pdf", **REPORT)
    text = " ".join(PdfReader(path).pages[0].extract_text().split())
    assert "MÜLLER, LUCJA" in text


def test_sample_text_report_is_plain_utf8_text(tmp_path: Path) -> None:
    path = write_sample_report_txt(tmp_path / "report.txt", **REPORT)
    assert classify(path) == ("text/plain", None)
    text = path.read_text(encoding="utf-8")
    assert "MÜLLER, ŁUCJA" in text
    assert "ACC-99120" in text
    assert "Normal CT of the head." in text
