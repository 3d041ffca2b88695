"""A received report, delivered beside itself in the recipient's preferred format."""

from __future__ import annotations

import shutil

import pytest
from pydicom.data import get_testdata_file

from emix_core.errors import ReportFormatError
from emix_core.plugins import get_plugin_manager
from emix_core.reports.convert import (
    context_from_studies,
    deliver_in_preferred_format,
    parse_report,
    render_report,
)
from tests.test_reports import full_report


@pytest.fixture(scope="module")
def pm():
    return get_plugin_manager(load_entry_points=False)


@pytest.fixture
def documents(tmp_path):
    folder = tmp_path / "package" / "documents"
    folder.mkdir(parents=True)
    return folder


def test_copy_is_written_beside_the_original_which_is_kept(pm, documents):
    original = render_report(pm, full_report(), "hl7")
    src = documents / "0001-report.hl7"
    src.write_bytes(original)
    copy = deliver_in_preferred_format(pm, src, "cda")
    assert copy == documents / "0001-report.xml"
    assert src.read_bytes() == original
    assert parse_report(pm, copy.read_bytes()) == parse_report(pm, original)
    assert sorted(p.name for p in documents.iterdir()) == ["0001-report.hl7", "0001-report.xml"]


def test_delivering_twice_does_not_duplicate_and_never_overwrites(pm, documents):
    src = documents / "0002-report.json"
    src.write_bytes(render_report(pm, full_report(), "fhir"))
    unrelated = documents / "0002-report.txt"
    unrelated.write_text("the sender's own notes, not ours to overwrite")
    first = deliver_in_preferred_format(pm, src, "txt")
    second = deliver_in_preferred_format(pm, src, "txt")
    assert first == second == documents / "0002-report-1.txt"
    assert unrelated.read_text() == "the sender's own notes, not ours to overwrite"
    assert not list(documents.glob(".*"))  # no temporary file left behind


def test_nothing_to_do_for_a_report_already_in_that_format_or_a_non_report(pm, documents):
    src = documents / "0003-report.hl7"
    src.write_bytes(render_report(pm, full_report(), "hl7"))
    assert deliver_in_preferred_format(pm, src, "hl7") is None
    dicom = documents / "0004-image"
    shutil.copy(get_testdata_file("CT_small.dcm"), dicom)
    assert deliver_in_preferred_format(pm, dicom, "pdf") is None
    manifest = documents / "emix-manifest.json"
    manifest.write_text('{"format": "emix-manifest/1", "items": []}')
    assert deliver_in_preferred_format(pm, manifest, "hl7") is None
    assert sorted(p.name for p in documents.iterdir()) == [
        "0003-report.hl7",
        "0004-image",
        "emix-manifest.json",
    ]


def test_pdf_report_travels_inside_an_hl7_report_with_the_package_subject(pm, documents):
    pdf = render_report(pm, full_report(), "pdf")
    src = documents / "0005-report.pdf"
    src.write_bytes(pdf)
    studies = [
        {
            "study_uid": "1.2.826.0.1.3680043.8.498.10101",
            "patient_name": "MUSTERMANN^ERIKA",
            "patient_id": "PID-7734-XQ",
            "accession_number": "ACC-99120",
        }
    ]
    copy = deliver_in_preferred_format(
        pm, src, "hl7", context=context_from_studies(studies, "Mercy General")
    )
    report = parse_report(pm, copy.read_bytes())
    assert report.attachments[0].data == pdf
    assert report.attachments[0].media_type == "application/pdf"
    assert report.patient.id == "PID-7734-XQ"
    assert report.patient.name.family == "MUSTERMANN"
    assert report.accession_number == "ACC-99120"
    assert report.facility == "Mercy General"
    # a PDF cannot become text: nothing is written
    assert deliver_in_preferred_format(pm, src, "txt") is None


def test_legacy_text_report_is_converted_and_a_broken_report_is_an_error(pm, documents):
    legacy = documents / "0006-dictation.txt"
    legacy.write_text("CT HEAD\nNo acute findings.\n", encoding="utf-8")
    copy = deliver_in_preferred_format(pm, legacy, "fhir")
    assert parse_report(pm, copy.read_bytes()).findings == "CT HEAD\nNo acute findings."
    broken = documents / "0007-report.hl7"
    broken.write_bytes(b"MSH|^~!&|RIS|X|||20250101||ORU^R01|1|P|2.5.1\r")
    with pytest.raises(ReportFormatError, match="MSH-2"):
        deliver_in_preferred_format(pm, broken, "cda")
