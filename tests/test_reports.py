"""Reports in every format: round trips, conversions validated by each format's own tools."""

from __future__ import annotations

import io
import json
import re
from dataclasses import replace
from datetime import date, datetime, timedelta, timezone

import pytest
from lxml import etree
from pypdf import PdfReader

from emix_core.errors import ConfigError, PayloadTooLarge, ReportFormatError
from emix_core.plugins import get_plugin_manager, hookimpl
from emix_core.reports import fhir
from emix_core.reports import pdf as pdf_format
from emix_core.reports.convert import (
    FORMATS,
    MAX_REPORT_BYTES,
    READABLE_FORMATS,
    convert,
    parse_report,
    render_report,
    report_formats,
    sniff_report_format,
)
from emix_core.reports.hl7 import escape
from emix_core.reports.model import Attachment, Author, Code, Patient, PersonName, Report

CET = timezone(timedelta(hours=1))
FACILITY = "Klinikum München"
IMPRESSION = "No acute intracranial abnormality."


def full_report(**changes) -> Report:
    """A realistic final CT head report, names outside ASCII, one PDF attachment."""
    report = Report(
        patient=Patient(
            name=PersonName("Müller", "Hans", "Peter", "Dr.", "Jr."),
            id="PID-7734",
            issuer="1.2.276.0.7230010.3",
            birth_date=date(1958, 3, 4),
            sex="M",
        ),
        accession_number="ACC-99120",
        study_instance_uid="1.2.826.0.1.3680043.8.498.10101",
        procedure=Code("36554-4", "CT Head WO contrast", "http://loinc.org"),
        author=Author(PersonName("山田", "太郎"), "RAD-001"),
        status="final",
        findings=(
            "Technique: axial images, 5 mm.\n\n"
            "No haemorrhage, mass effect or midline shift.\n"
            "  Ventricles: normal size.\n"
            "Values: 3 | 4 ^ 5 & 6 ~ 7 \\ 8."
        ),
        impression=IMPRESSION,
        observation_time=datetime(2025, 1, 15, 9, 30, 0, tzinfo=CET),
        report_time=datetime(2025, 1, 15, 11, 2, 45, tzinfo=CET),
        attachments=[Attachment("application/pdf", b"%PDF-1.4\n% signed copy\n", "Signed report")],
        facility=FACILITY,
    )
    return replace(report, **changes)


def carried(report: Report, fmt: str) -> Report:
    """What a format can carry of a report: text lists attachments but does not hold them."""
    return replace(report, attachments=[]) if fmt == "txt" else report


@pytest.fixture(scope="module")
def pm():
    return get_plugin_manager(load_entry_points=False)


# --------------------------------------------------------------------------- validators


def check_hl7(data: bytes, report: Report) -> None:
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    message = parse_message(data.decode("utf-8"), validation_level=VALIDATION_LEVEL.STRICT)
    message.validate()
    assert message.name == "ORU_R01"
    text = data.decode("utf-8")
    assert text.count("\r") == len([s for s in text.split("\r") if s])
    assert escape(report.patient.name.family) in text


def check_cda(data: bytes, report: Report) -> None:
    root = etree.fromstring(data, etree.XMLParser(resolve_entities=False, no_network=True))
    assert root.tag == "{urn:hl7-org:v3}ClinicalDocument"
    ns = {"v": "urn:hl7-org:v3"}
    assert root.find("v:typeId", ns).get("extension") == "POCD_HD000040"
    family = root.findtext("v:recordTarget/v:patientRole/v:patient/v:name/v:family", None, ns)
    assert family == (report.patient.name.family or None)
    sections = root.findall(".//v:section", ns)
    assert sections, "a CDA body has at least one section"


def check_fhir(data: bytes, report: Report) -> None:
    from fhir.resources.R4B.bundle import Bundle

    bundle = json.loads(data)
    Bundle.model_validate(bundle)
    resources = {e["resource"]["resourceType"]: e["resource"] for e in bundle["entry"]}
    assert {"Patient", "DiagnosticReport"} <= set(resources)
    assert bundle["type"] == "transaction"
    for entry in bundle["entry"]:
        assert entry["request"] == {"method": "POST", "url": entry["resource"]["resourceType"]} | (
            {"ifNoneExist": entry["request"]["ifNoneExist"]}
            if "ifNoneExist" in entry["request"]
            else {}
        )
    assert resources["DiagnosticReport"]["status"] in fhir.REPORT_STATUSES
    if report.study_instance_uid or report.accession_number or report.procedure:
        assert resources["ImagingStudy"]["status"] in fhir.IMAGING_STUDY_STATUSES
    if report.attachments:
        assert {"Binary", "DocumentReference"} <= set(resources)
    if "gender" in resources["Patient"]:
        assert resources["Patient"]["gender"] in fhir.GENDERS
    if "Observation" in resources:
        assert resources["Observation"]["status"] in fhir.OBSERVATION_STATUSES
    for entry in bundle["entry"]:
        assert entry["fullUrl"].startswith("urn:uuid:")


def pdf_text(data: bytes) -> str:
    return "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(data)).pages)


def check_pdf(data: bytes, report: Report) -> None:
    text = pdf_text(data)
    assert report.facility in text
    assert report.impression.split("\n")[0] in text
    assert "Page 1 of" in text


def check_rtf(data: bytes, report: Report) -> None:
    text = data.decode("ascii")  # every non-ASCII character is escaped
    assert text.startswith("{\\rtf1")
    unescaped = re.sub(r"\\[\\{}]", "", text)
    assert unescaped.count("{") == unescaped.count("}")
    assert escaped_rtf(report.impression) in text


def escaped_rtf(value: str) -> str:
    from emix_core.reports.rtf import escape

    return escape(value)


def check_txt(data: bytes, report: Report) -> None:
    text = data.decode("utf-8")
    assert text.startswith("DIAGNOSTIC IMAGING REPORT\n")
    assert report.impression.split("\n")[0] in text


CHECKS = {
    "hl7": check_hl7,
    "cda": check_cda,
    "fhir": check_fhir,
    "pdf": check_pdf,
    "rtf": check_rtf,
    "txt": check_txt,
}


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", READABLE_FORMATS)
def test_round_trip_gives_the_same_report(pm, fmt):
    report = full_report()
    data = render_report(pm, report, fmt)
    assert parse_report(pm, data) == carried(report, fmt)


@pytest.mark.parametrize("fmt", READABLE_FORMATS)
def test_cjk_and_accented_names_survive_every_format_that_reads_back(pm, fmt):
    report = full_report(
        patient=Patient(PersonName("山田", "花子"), "JP-0042", "Tokyo General", sex="F"),
        author=Author(PersonName("Nuñez-Ørsted", "Zoë", prefix="Dr."), "R-9"),
        facility="Hôpital Saint-Éloi 東京",
        impression="Kein Nachweis einer Blutung. 異常なし。",
    )
    assert parse_report(pm, render_report(pm, report, fmt)) == carried(report, fmt)


@pytest.mark.parametrize("status", ["preliminary", "final", "amended"])
@pytest.mark.parametrize("fmt", READABLE_FORMATS)
def test_every_status_round_trips(pm, fmt, status):
    report = full_report(status=status)
    assert parse_report(pm, render_report(pm, report, fmt)).status == status


@pytest.mark.parametrize("src", READABLE_FORMATS)
@pytest.mark.parametrize("dst", list(FORMATS))
def test_every_format_converts_to_every_other_and_validates(pm, src, dst):
    report = full_report()
    source = render_report(pm, report, src)
    output = convert(pm, source, dst)
    expected = carried(report, src)
    CHECKS[dst](output, expected)
    assert sniff_report_format(output) == dst
    if dst in READABLE_FORMATS:
        assert parse_report(pm, output) == carried(expected, dst)


@pytest.mark.parametrize(
    "report",
    [
        full_report(study_instance_uid="", accession_number="", attachments=[]),
        Report(findings="Outside film review.", impression="See comments."),
    ],
    ids=["patient-without-study", "nothing-but-text"],
)
def test_a_report_that_matches_no_study_is_still_a_report(pm, report):
    for fmt in FORMATS:
        data = render_report(pm, report, fmt)
        CHECKS[fmt](data, report)
        if fmt in READABLE_FORMATS:
            assert parse_report(pm, data) == report


def test_hl7_escapes_delimiters_and_segment_ends_in_our_own_text(pm):
    hostile = "a|b^c&d~e\\f\nMSH|^~\\&|EVIL\nOBX|99|TX|X||injected"
    report = full_report(
        findings=hostile,
        patient=Patient(PersonName("O'Brien|X^Y", "Ann&Lee~Z"), "ID|1^2"),
    )
    data = render_report(pm, report, "hl7")
    segments = [s for s in data.decode().split("\r") if s]
    assert [s[:3] for s in segments] == ["MSH", "PID", "ORC", "OBR", "OBX", "OBX", "OBX", "OBX"]
    check_hl7(data, report)
    assert parse_report(pm, data) == report


# --------------------------------------------------------------------------- PDF and RTF


def test_pdf_shows_facility_sections_page_numbers_and_unicode_names(pm):
    long_findings = "\n".join(f"Line {n}: unremarkable slice review." for n in range(160))
    data = render_report(pm, full_report(findings=long_findings), "pdf")
    pages = [page.extract_text() for page in PdfReader(io.BytesIO(data)).pages]
    assert len(pages) >= 3
    for number, text in enumerate(pages, start=1):
        assert FACILITY in text
        assert f"Page {number} of {len(pages)}" in text
    everything = "\n".join(pages)
    assert "Müller" in everything and "山田" in everything
    assert "Findings" in everything and "Impression" in everything and IMPRESSION in everything
    reader = PdfReader(io.BytesIO(data))
    assert list(reader.attachments) == ["attachment-1.pdf"]


def test_pdf_without_unicode_fonts_is_still_produced(pm, monkeypatch, tmp_path):
    monkeypatch.setattr(pdf_format, "FONT_DIRS", ())
    monkeypatch.setenv("EMIX_FONT_DIR", str(tmp_path))
    data = render_report(pm, full_report(), "pdf")
    text = pdf_text(data)
    assert FACILITY in text and IMPRESSION in text  # Latin-1 still renders
    assert "Müller" in text


def test_rtf_escapes_specials_and_non_ascii(pm):
    report = full_report(findings="Braces {x} and \\ back, tab\there, 𠮷 and ü.")
    text = render_report(pm, report, "rtf").decode("ascii")
    assert "Braces \\{x\\} and \\\\ back, tab\\tab here" in text
    assert "\\u-10174?\\u-8265?" in text  # U+20BB7 as a UTF-16 surrogate pair
    assert "\\u252?" in text  # ü
    assert "M\\u252?ller" in text


# --------------------------------------------------------------------------- FHIR codes


def test_fhir_codes_outside_their_value_sets_are_refused(pm):
    bundle = json.loads(render_report(pm, full_report(), "fhir"))
    for kind, name, bad in (
        ("Patient", "gender", "bogus"),
        ("DiagnosticReport", "status", "done"),
        ("ImagingStudy", "status", "finished"),
    ):
        changed = json.loads(json.dumps(bundle))
        for entry in changed["entry"]:
            if entry["resource"]["resourceType"] == kind:
                entry["resource"][name] = bad
        with pytest.raises(ReportFormatError, match=f"{kind}.{name}"):
            parse_report(pm, json.dumps(changed).encode())


def test_fhir_cancelled_report_and_bundle_without_report_are_refused(pm):
    bundle = json.loads(render_report(pm, full_report(), "fhir"))
    for entry in bundle["entry"]:
        if entry["resource"]["resourceType"] == "DiagnosticReport":
            entry["resource"]["status"] = "entered-in-error"
    with pytest.raises(ReportFormatError, match="entered-in-error"):
        parse_report(pm, json.dumps(bundle).encode())
    empty = {"resourceType": "Bundle", "type": "collection", "entry": []}
    with pytest.raises(ReportFormatError, match="no DiagnosticReport"):
        parse_report(pm, json.dumps(empty).encode())


def test_fhir_validation_error_names_the_field_not_the_value(pm):
    bundle = json.loads(render_report(pm, full_report(), "fhir"))
    for entry in bundle["entry"]:
        if entry["resource"]["resourceType"] == "Patient":
            entry["resource"]["birthDate"] = "SECRET-Müller"
    with pytest.raises(ReportFormatError) as caught:
        parse_report(pm, json.dumps(bundle).encode())
    assert "birthDate" in caught.value.message
    assert "SECRET" not in caught.value.message and "Müller" not in caught.value.message


# --------------------------------------------------------------------------- API


def test_formats_are_recognised_by_content_not_by_name(pm, tmp_path):
    from pydicom.data import get_testdata_file

    for fmt in FORMATS:
        assert sniff_report_format(render_report(pm, full_report(), fmt)) == fmt
    dicom = open(get_testdata_file("CT_small.dcm"), "rb").read()  # noqa: SIM115
    assert sniff_report_format(dicom) is None
    assert sniff_report_format(b'{"format": "emix-manifest/1", "items": []}') is None
    assert sniff_report_format(b"Just some notes.") is None


def test_legacy_plain_text_declared_as_text_is_a_report(pm):
    text = "CT HEAD: no bleed.\nDictated by Dr. Weiß".encode()
    report = parse_report(pm, text, "text/plain; charset=utf-8")
    assert report.findings == "CT HEAD: no bleed.\nDictated by Dr. Weiß"
    hl7 = render_report(pm, full_report(), "hl7")
    assert parse_report(pm, hl7, "text/plain").accession_number == "ACC-99120"


def test_pdf_and_rtf_are_output_only(pm):
    for fmt in ("pdf", "rtf"):
        with pytest.raises(ReportFormatError, match="output only"):
            parse_report(pm, render_report(pm, full_report(), fmt))


def test_unknown_input_and_unknown_format_are_clear_errors(pm):
    with pytest.raises(ReportFormatError, match="not a report emix can read"):
        parse_report(pm, b"\x89PNG\r\n\x1a\n....")
    with pytest.raises(ReportFormatError, match="no installed plugin renders"):
        render_report(pm, full_report(), "docx")


def test_a_report_larger_than_the_bound_is_refused(pm):
    with pytest.raises(PayloadTooLarge):
        parse_report(pm, b"MSH|" + b" " * MAX_REPORT_BYTES)


def test_an_installed_plugin_overrides_a_builtin_format_and_adds_one():
    class AcmeReports:
        @hookimpl
        def emix_render_report(self, report, format):
            if format == "pdf":
                return b"%PDF-1.7 acme"
            if format == "acme":
                return f"ACME {report.accession_number}".encode()
            return None

        @hookimpl
        def emix_register_report_formats(self, register):
            register("acme", "application/x-acme", ".acme", readable=True)

        @hookimpl
        def emix_parse_report(self, data, media_type):
            if media_type == "application/x-acme":
                return Report(accession_number=data.decode().split()[1])
            return None

    pm = get_plugin_manager(load_entry_points=False)
    pm.register(AcmeReports(), name="acme-reports")
    report = full_report()
    assert render_report(pm, report, "pdf") == b"%PDF-1.7 acme"
    assert render_report(pm, report, "acme") == b"ACME ACC-99120"
    parsed = parse_report(pm, b"ACME ACC-1", "application/x-acme")
    assert parsed.accession_number == "ACC-1"
    # formats the plugin leaves alone still come from the built-ins
    assert render_report(pm, report, "hl7").startswith(b"MSH|")
    # the one registry: the plugin's format sits beside the six built-in ones
    formats = report_formats(pm)
    assert list(formats) == ["acme", "hl7", "cda", "fhir", "pdf", "rtf", "txt"]
    assert formats["acme"] == ("application/x-acme", ".acme", True)
    assert not formats["pdf"].readable


def test_a_plugin_format_can_be_a_facility_preferred_format(tmp_path):
    """A received report is delivered in a plugin's format, with the plugin's extension."""
    from emix_core.reports.convert import deliver_in_preferred_format

    class AcmeReports:
        @hookimpl
        def emix_register_report_formats(self, register):
            register("acme", "application/x-acme", ".acme")

        @hookimpl
        def emix_render_report(self, report, format):
            return f"ACME {report.accession_number}".encode() if format == "acme" else None

    pm = get_plugin_manager(load_entry_points=False)
    pm.register(AcmeReports(), name="acme-reports")
    src = tmp_path / "report.hl7"
    src.write_bytes(render_report(pm, full_report(), "hl7"))
    copy = deliver_in_preferred_format(pm, src, "acme")
    assert copy is not None and copy.name == "report.acme"
    assert copy.read_bytes() == b"ACME ACC-99120"


def test_a_badly_named_plugin_format_is_refused():
    class Bad:
        @hookimpl
        def emix_register_report_formats(self, register):
            register("../evil", "text/plain", ".txt")

    pm = get_plugin_manager(load_entry_points=False)
    pm.register(Bad(), name="bad-formats")
    with pytest.raises(ConfigError, match="lowercase"):
        report_formats(pm)
