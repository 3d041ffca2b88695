"""Reports and attachments recognised by content; file names made safe."""

from __future__ import annotations

import codecs
from pathlib import Path

import pytest

from emix_core.content.documents import classify, safe_name, sniff_document
from emix_core.errors import NotDicomError

HL7_ORU = (
    b"MSH|^~\\&|RIS|MERCY|EMR|LAKESIDE|202501150930||ORU^R01|MSG0001|P|2.5.1\r"
    b"PID|1||PID-7734-XQ||MUSTERMANN^ERIKA\r"
    b"OBR|1||ACC-99120|CTHEAD^CT HEAD\r"
    b"OBX|1|TX|IMP||Normal study.||||||F\r"
)
CDA = """<?xml version="1.0" encoding="UTF-8"?>
<?xml-stylesheet type="text/xsl" href="CDA.xsl"?>
<!-- a radiology report -->
<ClinicalDocument xmlns="urn:hl7-org:v3" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <typeId root="2.16.840.1.113883.1.3" extension="POCD_HD000040"/>
  <title>CT Kopf – Befund</title>
</ClinicalDocument>
"""
FHIR = '{\n  "resourceType": "DiagnosticReport",\n  "id": "r1",\n  "status": "final"\n}\n'


def write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    path = tmp_path / name
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("data", "media_type"),
    [
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "application/pdf"),
        (b"{\\rtf1\\ansi\\deff0 {\\fonttbl {\\f0 Times;}} Befund}", "application/rtf"),
        (HL7_ORU, "application/hl7-v2"),
        (b"\x0b" + HL7_ORU + b"\x1c\r", "application/hl7-v2"),
        (CDA.encode(), "application/cda+xml"),
        (codecs.BOM_UTF16_LE + CDA.encode("utf-16-le"), "application/cda+xml"),
        (
            CDA.replace("<ClinicalDocument xmlns=", "<cda:ClinicalDocument xmlns:cda=")
            .replace("</ClinicalDocument>", "</cda:ClinicalDocument>")
            .encode(),
            "application/cda+xml",
        ),
        (FHIR.encode(), "application/fhir+json"),
        ("Befund: unauffällig.\nBeurteilung: Normalbefund.\n".encode(), "text/plain"),
        ("所見：異常なし\n".encode(), "text/plain"),
    ],
)
def test_documents_are_recognised_by_content_whatever_their_name(
    tmp_path: Path, data: bytes, media_type: str
) -> None:
    path = write(tmp_path, "IM000001.dcm", data)
    assert sniff_document(path) == media_type
    assert classify(path) == (media_type, None)


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x01\x02\x03" * 100,
        b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(range(256)) * 4,
        b"\x89PNG\r\n\x1a\n" + bytes(200),
        b"text with a NUL\x00 inside",
        b"caf\xe9 latin-1 is not UTF-8",
        b"",
    ],
)
def test_binary_junk_is_refused(tmp_path: Path, data: bytes) -> None:
    path = write(tmp_path, "report.pdf", data)
    assert sniff_document(path) is None
    with pytest.raises(NotDicomError) as error:
        classify(path)
    assert error.value.message.startswith("report.pdf: ")


def test_junk_error_lists_what_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, "scan.bin", b"\x00\xff" * 2000)
    with pytest.raises(NotDicomError, match=r"not DICOM and not a recognised document \(PDF"):
        classify(path)


def test_xml_that_is_not_cda_is_plain_text(tmp_path: Path) -> None:
    other_namespace = CDA.replace("urn:hl7-org:v3", "urn:example:other")
    assert sniff_document(write(tmp_path, "a.xml", other_namespace)) == "text/plain"
    other_root = CDA.replace("ClinicalDocument", "Report")
    assert sniff_document(write(tmp_path, "b.xml", other_root)) == "text/plain"


def test_cda_with_a_doctype_is_still_recognised_without_expanding_entities(
    tmp_path: Path,
) -> None:
    hostile = CDA.replace(
        "<!-- a radiology report -->",
        '<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd"><!ENTITY a "&e;&e;">]>',
    )
    assert sniff_document(write(tmp_path, "r.xml", hostile)) == "application/cda+xml"


def test_text_starting_with_msh_but_no_separators_is_not_hl7(tmp_path: Path) -> None:
    path = write(tmp_path, "a.hl7", b"MSH is the segment name of an HL7 header\n")
    assert sniff_document(path) == "text/plain"


def test_json_that_is_not_fhir_is_plain_text(tmp_path: Path) -> None:
    assert sniff_document(write(tmp_path, "a.json", '{"kind": "report"}')) == "text/plain"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../../x", "x"),
        ("..\\..\\windows\\win.ini", "win.ini"),
        ("/etc/passwd", "passwd"),
        ("a\x00b", "ab"),
        ("", "fallback"),
        ("....", "fallback"),
        ("..", "fallback"),
        (".hidden", "hidden"),
        ("report..pdf", "report.pdf"),
        ("line\nbreak\r.txt", "linebreak.txt"),
        ("invoice\u202efdp.exe", "invoicefdp.exe"),
        ("Befund Müller – 2025.pdf", "Befund Müller – 2025.pdf"),
        ("所見.txt", "所見.txt"),
        ("a<b>c:d|e?f*.pdf", "a_b_c_d_e_f_.pdf"),
        ("CON.txt", "_CON.txt"),
        ("trailing. . ", "trailing"),
    ],
)
def test_safe_name(name: str, expected: str) -> None:
    assert safe_name(name, fallback="fallback") == expected


def test_a_10_kb_name_is_cut_to_120_characters_keeping_its_extension() -> None:
    name = safe_name("x" * 10_000 + ".pdf", fallback="f")
    assert len(name) == 120
    assert name.endswith("xxx.pdf")
    wide = safe_name("所" * 10_000 + ".txt", fallback="f")
    assert wide.endswith(".txt")
    assert len(wide.encode()) <= 240


def test_safe_names_never_leave_their_folder(tmp_path: Path) -> None:
    hostile = [
        "../" * 50 + "etc/cron.d/x",
        "..\\..\\boot.ini",
        "\x00",
        "/",
        "~/.ssh/id",
        "\\\\srv\\s",
    ]
    for name in hostile:
        safe = safe_name(name, fallback="item")
        target = (tmp_path / safe).resolve()
        assert target.parent == tmp_path.resolve(), name
        assert "/" not in safe and "\\" not in safe and "\x00" not in safe
