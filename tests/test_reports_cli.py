"""``emix report convert FILE --to FORMAT [--out FILE] [--json]``."""

from __future__ import annotations

import io
import json
import os
import pty
import subprocess
import sys

import pytest
from click.testing import CliRunner
from pypdf import PdfReader

from emix_core.plugins import get_plugin_manager
from emix_core.reports.cli import report as report_group
from emix_core.reports.convert import parse_report, render_report
from emix_core.testing import emix
from tests.conftest import ROOT
from tests.test_reports import FACILITY, IMPRESSION, full_report


@pytest.fixture(scope="module")
def pm():
    return get_plugin_manager(load_entry_points=False)


@pytest.fixture
def hl7_file(pm, tmp_path):
    path = tmp_path / "report.hl7"
    path.write_bytes(render_report(pm, full_report(), "hl7"))
    return path


def run(*args: str):
    return CliRunner().invoke(report_group, list(args), catch_exceptions=False)


def test_text_formats_go_to_standard_output(pm, hl7_file):
    result = run("convert", str(hl7_file), "--to", "cda")
    assert result.exit_code == 0, result.stderr
    assert parse_report(pm, result.stdout_bytes) == full_report()


@pytest.mark.e2e  # a real process
def test_out_file_and_json_summary(pm, hl7_file, tmp_path):
    out = tmp_path / "copy.pdf"
    result = run("convert", str(hl7_file), "--to", "pdf", "--out", str(out), "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary == {
        "out": str(out),
        "format": "pdf",
        "media_type": "application/pdf",
        "bytes": out.stat().st_size,
    }
    text = "".join(p.extract_text() for p in PdfReader(io.BytesIO(out.read_bytes())).pages)
    assert FACILITY in text and IMPRESSION in text


@pytest.mark.e2e  # a real process
def test_pdf_is_not_written_to_a_terminal(hl7_file):
    controller, terminal = pty.openpty()
    try:
        process = subprocess.run(
            [
                sys.executable,
                "-c",
                "from emix_core.reports.cli import report; report()",
                "convert",
                str(hl7_file),
                "--to",
                "pdf",
            ],
            stdout=terminal,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=60,
        )
    finally:
        os.close(terminal)
        os.close(controller)
    assert process.returncode == 2
    assert b"refusing to write it to a terminal" in process.stderr


def test_unreadable_input_exits_1_with_a_message_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text(
        '<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
        '<ClinicalDocument xmlns="urn:hl7-org:v3">&e;</ClinicalDocument>'
    )
    result = run("convert", str(bad), "--to", "hl7")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: the CDA document has a DOCTYPE")
    assert "Traceback" not in result.stderr and result.stdout == ""
    pdf = tmp_path / "r.pdf"
    pdf.write_bytes(b"%PDF-1.4\n")
    result = run("convert", str(pdf), "--to", "hl7", "--json", "--out", str(tmp_path / "x"))
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"] == "report_format"


def test_usage_errors_exit_2(hl7_file):
    assert run("convert", str(hl7_file), "--to", "docx").exit_code == 2
    assert run("convert", str(hl7_file), "--to", "cda", "--json").exit_code == 2
    assert run("convert", str(hl7_file)).exit_code == 2
    assert run("convert", "/no/such/report.hl7", "--to", "cda").exit_code == 2


@pytest.mark.e2e  # a real process
def test_the_emix_command_line_has_report_convert(pm, hl7_file, tmp_path):
    out = tmp_path / "report.json"
    emix("report", "convert", str(hl7_file), "--to", "fhir", "--out", str(out))
    assert parse_report(pm, out.read_bytes()) == full_report()
