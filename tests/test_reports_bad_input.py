"""Hostile and broken reports: refused clearly, quickly, with nothing read or fetched."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from emix_core.errors import ReportFormatError
from emix_core.plugins import get_plugin_manager
from emix_core.reports.convert import parse_report, render_report
from emix_core.testing import free_port

CDA_BODY = (
    '<ClinicalDocument xmlns="urn:hl7-org:v3"><title>{title}</title>'
    "<component><structuredBody><component><section><title>Findings</title>"
    "<text>{text}</text></section></component></structuredBody></component>"
    "</ClinicalDocument>"
)
ORU_HEAD = (
    "MSH|^~\\&|RIS|MERCY|||20250115110000||ORU^R01|MSG0001|P|2.5.1\r"
    "PID|1||PID-7734^^^MERCY^MR||DOE^JANE||19600101|F\r"
    "OBR|1||ACC-1|CTHEAD^CT Head^L|||20250115093000||||||||||||||20250115110000|||F\r"
)


@pytest.fixture(scope="module")
def pm():
    return get_plugin_manager(load_entry_points=False)


def parse_cda(pm, xml: str) -> None:
    parse_report(pm, xml.encode("utf-8"), "application/cda+xml")


# --------------------------------------------------------------------------- CDA


def test_cda_external_entity_is_refused_and_the_file_never_opened(pm, tmp_path):
    # libxml2 would block opening a FIFO that has no writer: a parse that finishes
    # proves the file was never opened (and a hang would fail the test, not the suite).
    fifo = tmp_path / "passwd"
    os.mkfifo(fifo)
    xml = (
        f'<?xml version="1.0"?><!DOCTYPE ClinicalDocument [<!ENTITY xxe SYSTEM "file://{fifo}">'
        f"]>" + CDA_BODY.format(title="&xxe;", text="&xxe;")
    )
    errors: list[Exception] = []
    worker = threading.Thread(target=lambda: _collect(errors, parse_cda, pm, xml), daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # release the reader
        pytest.fail("the parser opened the external entity's file")
    assert len(errors) == 1 and isinstance(errors[0], ReportFormatError)
    assert "DOCTYPE" in errors[0].message


def test_cda_external_entity_to_etc_passwd_is_refused(pm):
    xml = (
        '<?xml version="1.0"?><!DOCTYPE ClinicalDocument '
        '[<!ENTITY xxe SYSTEM "file:///etc/passwd">]>' + CDA_BODY.format(title="&xxe;", text="x")
    )
    with pytest.raises(ReportFormatError, match="DOCTYPE") as caught:
        parse_cda(pm, xml)
    assert "root:" not in caught.value.message


def _collect(errors: list[Exception], func, *args) -> None:  # type: ignore[no-untyped-def]
    try:
        func(*args)
    except Exception as exc:
        errors.append(exc)


def test_cda_dtd_pointing_elsewhere_is_refused_without_a_connection(pm):
    port = free_port()
    listener = socket.create_server(("127.0.0.1", port))
    listener.settimeout(0.5)
    try:
        xml = (
            f'<?xml version="1.0"?><!DOCTYPE ClinicalDocument SYSTEM '
            f'"http://127.0.0.1:{port}/x.dtd">' + CDA_BODY.format(title="t", text="x")
        )
        with pytest.raises(ReportFormatError, match="DOCTYPE"):
            parse_cda(pm, xml)
        with pytest.raises(TimeoutError):
            listener.accept()  # nobody tried to fetch the DTD
    finally:
        listener.close()


def test_cda_billion_laughs_is_refused_at_once(pm):
    entities = '<!ENTITY lol0 "lol">' + "".join(
        f'<!ENTITY lol{n} "{f"&lol{n - 1};" * 10}">' for n in range(1, 10)
    )
    xml = f'<?xml version="1.0"?><!DOCTYPE ClinicalDocument [{entities}]>' + CDA_BODY.format(
        title="&lol9;", text="&lol9;"
    )
    started = time.monotonic()
    with pytest.raises(ReportFormatError, match="DOCTYPE"):
        parse_cda(pm, xml)
    assert time.monotonic() - started < 1


def test_cda_doctype_hidden_in_utf16_is_refused(pm):
    xml = (
        '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE ClinicalDocument '
        '[<!ENTITY xxe SYSTEM "file:///etc/passwd">]>' + CDA_BODY.format(title="&xxe;", text="x")
    )
    with pytest.raises(ReportFormatError, match="DOCTYPE"):
        parse_report(pm, xml.encode("utf-16"), "application/cda+xml")


def test_cda_that_is_not_well_formed_or_not_cda_is_a_clear_error(pm):
    with pytest.raises(ReportFormatError, match="not well-formed"):
        parse_cda(pm, '<ClinicalDocument xmlns="urn:hl7-org:v3"><title>')
    with pytest.raises(ReportFormatError, match="ClinicalDocument"):
        parse_cda(pm, "<html><body>report</body></html>")


# --------------------------------------------------------------------------- HL7 v2


def oru(*observations: str) -> bytes:
    return (ORU_HEAD + "".join(o + "\r" for o in observations)).encode("utf-8")


def test_hl7_with_wrong_msh2_is_refused_naming_the_field(pm):
    for bad in (b"MSH|^~!&|", b"MSH|abc|", b"MSH|^~\\|", b"MSH#^~\\&#"):
        data = oru("OBX|1|TX|GDT||text||||||F").replace(b"MSH|^~\\&|", bad, 1)
        with pytest.raises(ReportFormatError, match="MSH-2"):
            parse_report(pm, data, "application/hl7-v2")


def test_hl7_with_lf_only_segment_ends_is_read_like_cr(pm):
    data = oru("OBX|1|TX|GDT||Line one||||||F", "OBX|2|TX|GDT||Line two||||||F")
    from_cr = parse_report(pm, data)
    from_lf = parse_report(pm, data.replace(b"\r", b"\n"))
    from_crlf = parse_report(pm, data.replace(b"\r", b"\r\n"))
    assert from_lf == from_cr == from_crlf
    assert from_lf.findings == "Line one\nLine two"
    assert from_lf.patient.id == "PID-7734"


def test_hl7_escape_sequences_never_become_segments(pm):
    # \X0D\ decodes to a carriage return: it is text, and on the way out it is escaped
    evil = "DOE\\X0D\\OBX\\F\\9\\F\\TX\\F\\X\\F\\\\F\\INJECTED^JANE"
    data = oru("OBX|1|TX|GDT||Findings\\X0D\\OBX\\F\\2\\F\\TX\\F\\\\F\\\\F\\EVIL||||||F")
    data = data.replace(b"DOE^JANE", evil.encode())
    report = parse_report(pm, data)
    assert "\r" not in report.patient.name.family
    assert report.findings == "Findings\nOBX|2|TX|||EVIL"
    rendered = render_report(pm, report, "hl7")
    names = [segment[:3] for segment in rendered.split(b"\r") if segment]
    assert names == [b"MSH", b"PID", b"ORC", b"OBR", b"OBX"]
    assert parse_report(pm, rendered) == report


def test_hl7_fifty_megabyte_obx_is_refused_within_seconds(pm):
    data = oru("OBX|1|TX|GDT||" + "A" * 50_000_000 + "||||||F")
    started = time.monotonic()
    with pytest.raises(ReportFormatError, match="longer than"):
        parse_report(pm, data)
    assert time.monotonic() - started < 10


def test_hl7_fifty_megabyte_attachment_is_a_bounded_result(pm):
    data = oru("OBX|1|ED|18748-4^Scan^LN||^application^pdf^Base64^" + "QUJD" * 12_500_000)
    started = time.monotonic()
    report = parse_report(pm, data)
    assert time.monotonic() - started < 10
    assert len(report.attachments) == 1 and len(report.attachments[0].data) == 37_500_000


def test_hl7_with_too_many_segments_is_refused_at_once(pm):
    data = oru(*["NTE|1||x"] * 30_000)
    started = time.monotonic()
    with pytest.raises(ReportFormatError, match="segments"):
        parse_report(pm, data)
    assert time.monotonic() - started < 2


def test_hl7_other_messages_and_garbage_are_clear_errors(pm):
    adt = oru().replace(b"ORU^R01", b"ADT^A08")
    with pytest.raises(ReportFormatError, match="ADT\\^A08, not a report"):
        parse_report(pm, adt, "application/hl7-v2")
    with pytest.raises(ReportFormatError, match="MSH segment"):
        parse_report(pm, b"PID|1||x", "application/hl7-v2")
    cancelled = oru("OBX|1|TX|GDT||text||||||X").replace(b"|||F\r", b"|||X\r", 1)
    with pytest.raises(ReportFormatError, match="cancelled"):
        parse_report(pm, cancelled)


def test_hl7_in_mllp_framing_and_latin1_is_read(pm):
    data = oru("OBX|1|TX|GDT||Größe normal||||||F").decode().replace("2.5.1", "2.5.1||||||8859/1")
    framed = b"\x0b" + data.encode("latin-1") + b"\x1c\r"
    assert parse_report(pm, framed).findings == "Größe normal"


def test_error_messages_hold_no_phi(pm):
    data = oru("OBX|1|ST|113014^DICOM Study^DCM||1.2.NOT-A-UID.SECRET||||||F")
    with pytest.raises(ReportFormatError) as caught:
        parse_report(pm, data)
    message = caught.value.message
    assert "UID" in message
    for phi in ("SECRET", "DOE", "PID-7734", "ACC-1"):
        assert phi not in message


def test_cda_attachment_over_the_xml_text_limit_is_a_clear_error_both_ways(pm):
    from emix_core.reports.model import Attachment, Report

    big = Report(findings="x", attachments=[Attachment("application/pdf", b"%" * 8_000_000)])
    with pytest.raises(ReportFormatError, match="larger than 7 MB"):
        render_report(pm, big, "cda")
    xml = CDA_BODY.format(title="t", text="A" * 11_000_000)
    with pytest.raises(ReportFormatError, match="10 MB limit"):
        parse_cda(pm, xml)
