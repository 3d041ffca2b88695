"""C-FIND against ``emix dimse listen`` with dcmtk's ``findscu``: a PACS asks emix which
studies its facility may read on the hub, at study, series, image and patient level."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from emix_core import LocalHome, generate_study
from emix_core.testing import emix_json

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not shutil.which("findscu"), reason="needs dcmtk (bash .ci/system-deps)"),
]

PATIENT_ID = "PID-FIND-0815"
PATIENT_NAME = "Müller^Jürgen"
ACCESSION = "ACC-FIND-1"


def findscu(
    port: int, out: Path, keys: list[str], *, model: str = "-S", calling: str = "PACS"
) -> list[pydicom.Dataset]:
    """Run ``findscu``; the response identifiers it wrote, in order."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    args = [a for key in keys for a in ("-k", key)]
    result = subprocess.run(
        ["findscu", model, "-aet", calling, "-aec", "EMIX", "-X", "-od", str(out),
         *args, "127.0.0.1", str(port)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


@pytest.fixture
def shared_study(tmp_path: Path, mercy, lakeside) -> list[pydicom.Dataset]:
    """Mercy sent a two-series study to lakeside."""
    files = generate_study(
        tmp_path / "study",
        slices=6,
        series=2,
        rows=64,
        columns=64,
        patient_name=PATIENT_NAME,
        patient_id=PATIENT_ID,
        accession_number=ACCESSION,
    )
    sent = emix_json("send", str(tmp_path / "study"), "--to", "lakeside", env=mercy.env)
    assert sent["items"] == len(files)
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in files]


def test_findscu_finds_what_the_facility_may_read(listeners, shared_study, tmp_path):
    listener = listeners("lakeside", "--to", "mercy")
    study_uid = shared_study[0].StudyInstanceUID
    out = tmp_path / "rsp"

    studies = findscu(
        listener.port,
        out,
        ["QueryRetrieveLevel=STUDY", f"PatientID={PATIENT_ID}", "PatientName", "StudyDate",
         "StudyInstanceUID", "AccessionNumber", "ModalitiesInStudy",
         "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"],
    )  # fmt: skip
    assert len(studies) == 1
    found = studies[0]
    assert found.StudyInstanceUID == study_uid
    assert str(found.PatientName) == PATIENT_NAME  # UTF-8 from the hub, ISO_IR 192 on the wire
    assert found.AccessionNumber == ACCESSION
    assert found.NumberOfStudyRelatedSeries == 2
    assert found.NumberOfStudyRelatedInstances == len(shared_study)
    assert "StudyDate" in found and found.QueryRetrieveLevel == "STUDY"

    # matching is the hub's QIDO-RS matching: wildcards, case-insensitive names, ranges
    utf8 = "SpecificCharacterSet=ISO_IR 192"
    assert (
        len(findscu(listener.port, out, ["QueryRetrieveLevel=STUDY", utf8, "PatientName=müll*"]))
        == 1
    )
    assert findscu(listener.port, out, ["QueryRetrieveLevel=STUDY", "PatientName=SMITH*"]) == []
    assert (
        findscu(listener.port, out, ["QueryRetrieveLevel=STUDY", "StudyDate=19000101-19001231"])
        == []
    )
    assert (
        len(findscu(listener.port, out, ["QueryRetrieveLevel=STUDY", "StudyDate=19000101-"])) == 1
    )

    series = findscu(
        listener.port,
        out,
        ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study_uid}", "SeriesInstanceUID",
         "Modality", "SeriesNumber", "NumberOfSeriesRelatedInstances"],
    )  # fmt: skip
    expected_series = {d.SeriesInstanceUID for d in shared_study}
    assert {s.SeriesInstanceUID for s in series} == expected_series
    assert sum(s.NumberOfSeriesRelatedInstances for s in series) == len(shared_study)

    one_series = sorted(expected_series)[0]
    images = findscu(
        listener.port,
        out,
        ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study_uid}",
         f"SeriesInstanceUID={one_series}", "SOPInstanceUID", "SOPClassUID", "InstanceNumber"],
    )  # fmt: skip
    assert {i.SOPInstanceUID for i in images} == {
        d.SOPInstanceUID for d in shared_study if d.SeriesInstanceUID == one_series
    }

    patients = findscu(
        listener.port,
        out,
        ["QueryRetrieveLevel=PATIENT", f"PatientID={PATIENT_ID}", "PatientName", "PatientSex"],
        model="-P",
    )
    assert len(patients) == 1 and patients[0].PatientID == PATIENT_ID

    listener.stop()
    events = LocalHome(listener.home).audit_log.events(limit=None, include_phi=True)
    queries = [e for e in events if e["event_type"] == "query"]
    assert len(queries) == 8
    assert all(q["actor"] == "dicom:PACS" and q["source"] == "127.0.0.1" for q in queries)
    assert "C-FIND STUDY to EMIX: 1 matches" in queries[0]["detail"]
    answered = [line for line in listener.log_text().splitlines() if "dimse.find.answered" in line]
    assert len(answered) == 8 and "'query_level': 'IMAGE'" in "\n".join(answered)
    assert PATIENT_ID not in listener.log_text()  # the query stays out of the logs


def test_another_facility_finds_nothing_of_it(listeners, shared_study, tmp_path, hub):
    hub.add_facility("Hillside Clinic", "it@hillside.example.org", "hillside")
    listener = listeners("hillside", "--to", "mercy")
    found = findscu(
        listener.port, tmp_path / "rsp", ["QueryRetrieveLevel=STUDY", "StudyInstanceUID"]
    )
    assert found == []


def test_a_malformed_identifier_is_refused_and_the_listener_serves_on(
    listeners, shared_study, tmp_path
):
    listener = listeners("lakeside", "--to", "mercy")
    result = subprocess.run(
        ["findscu", "-v", "-S", "-aet", "PACS", "-aec", "EMIX", "-k", "QueryRetrieveLevel=NONSENSE",
         "-k", "PatientID", "127.0.0.1", str(listener.port)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    text = (result.stdout + result.stderr).lower().replace(" ", "")
    assert "datasetdoesnotmatchsopclass" in text, text
    again = findscu(listener.port, tmp_path / "rsp", ["QueryRetrieveLevel=STUDY", "PatientID"])
    assert len(again) == 1


def test_a_query_with_huge_and_many_keys_gets_a_status_and_leaks_nothing(
    listeners, shared_study, tmp_path
):
    listener = listeners("lakeside", "--to", "mercy")
    hostile = "Z" * 8000 + "*"
    keys = ["QueryRetrieveLevel=STUDY", f"PatientName={hostile}", f"PatientID={PATIENT_ID}"]
    keys += [f"(0009,{n:04x})=X" for n in range(0x10, 0x60)]  # private keys: ignored
    result = subprocess.run(
        ["findscu", "-v", "-S", "-aet", "PACS", "-aec", "EMIX",
         *[a for k in keys for a in ("-k", k)], "127.0.0.1", str(listener.port)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    text = result.stdout + result.stderr
    assert "Received Final Find Response" in text, text[-2000:]
    assert "Z" * 100 not in listener.log.read_text() and PATIENT_ID not in listener.log.read_text()
    again = findscu(listener.port, tmp_path / "rsp", ["QueryRetrieveLevel=STUDY", "PatientID"])
    assert len(again) == 1  # the listener serves on
