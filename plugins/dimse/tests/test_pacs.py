"""PACS → hub → PACS over DIMSE with real Orthanc instances, a real hub and the CLI:
``emix dimse send`` (C-FIND, then C-GET or C-MOVE) and ``emix dimse deliver`` (C-STORE)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from emix_core import LocalHome
from emix_core.testing import (
    HubProcess,
    Orthanc,
    Side,
    emix,
    free_port,
    make_hub,
    make_sample_study,
    needs_orthanc,
    side,
)
from plugins.dimse.tests.helpers import DCMTK, as_dcmtk_sends, dataset_bytes, received_files

pytestmark = [
    pytest.mark.e2e,
    needs_orthanc,
    pytest.mark.skipif(not DCMTK, reason="needs dcmtk (bash .ci/system-deps)"),
]

ACCESSION = "ACC-DIMSE-0042"
PATIENT_ID = "PID-DIMSE-0042"


@dataclass
class Exchange:
    hub: HubProcess
    mercy: Side
    lakeside: Side


@pytest.fixture(scope="module")
def exchange(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exchange]:
    root = tmp_path_factory.mktemp("exchange")
    hub = make_hub(root)
    try:
        hub.add_facility("Mercy General", "admin@mercy.example.org", "mercy")
        hub.add_facility("Lakeside Imaging", "it@lakeside.example.org", "lakeside", "hl7")
        yield Exchange(hub, side(root, hub, "mercy"), side(root, hub, "lakeside"))
    finally:
        hub.stop()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A study of compressed, multi-frame and generated instances, encoded as Orthanc's
    DICOM stack (dcmtk) puts data sets on the wire."""
    study = make_sample_study(
        tmp_path_factory.mktemp("study"), accession=ACCESSION, patient_id=PATIENT_ID, slices=8
    )
    return as_dcmtk_sends(study.files, tmp_path_factory.mktemp("wire"), study_uid=study.study_uid)


@pytest.fixture(scope="module")
def pacs1(orthanc_factory, files: list[Path]) -> Orthanc:
    """The sending facility's PACS; it knows emix as EMIX on 127.0.0.1."""
    move_port = free_port()
    pacs = orthanc_factory(
        "pacs1", dicom=True, modalities={"emix": ("EMIX", "127.0.0.1", move_port)}
    )
    pacs.move_port = move_port  # type: ignore[attr-defined]
    for path in files:
        pacs.upload(path)
    return pacs


def send(pacs: Orthanc, who: Side, *extra: str) -> dict:
    result = emix(
        "dimse",
        "send",
        "--pacs",
        pacs.dicom_address,
        "--accession",
        ACCESSION,
        "--to",
        "lakeside",
        "--json",
        *extra,
        env=who.env,
    )
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def moved(exchange: Exchange, pacs1: Orthanc) -> dict:
    return send(pacs1, exchange.mercy)


def by_sop(paths: list[Path]) -> dict[str, bytes]:
    return {
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: dataset_bytes(p) for p in paths
    }


def test_send_with_c_get_seals_the_study_with_identical_datasets(moved, files, exchange, tmp_path):
    assert moved["package"] and moved["failed"] == []
    assert moved["studies_found"] == 1
    assert moved["retrieved"]["method"] == "C-GET"
    assert moved["items"] == len(files) == moved["retrieved"]["instances"]
    got = received_files(moved["package"], tmp_path, exchange.lakeside.env)
    assert by_sop(got) == by_sop(files)
    events = LocalHome(exchange.mercy.home).audit_log.events(limit=None, include_phi=True)
    query = next(e for e in events if e["event_type"] == "query")
    assert query["phi"]["query"] == {"AccessionNumber": ACCESSION}
    assert ACCESSION not in query["detail"]
    assert any("C-GET from ORTHANC" in e["detail"] for e in events)


def test_send_with_c_move_to_emix(exchange, pacs1, files, tmp_path):
    answer = send(pacs1, exchange.mercy, "--move-dest", "EMIX", "--move-port", str(pacs1.move_port))
    assert answer["retrieved"]["method"] == "C-MOVE"
    assert answer["items"] == len(files)
    got = received_files(answer["package"], tmp_path, exchange.lakeside.env)
    assert by_sop(got) == by_sop(files)


def test_send_of_an_unknown_accession_says_so(exchange, pacs1):
    result = emix(
        "dimse",
        "send",
        "--pacs",
        pacs1.dicom_address,
        "--accession",
        "NOPE-1",
        "--to",
        "lakeside",
        env=exchange.mercy.env,
        check=False,
    )
    assert result.returncode == 1
    assert "no study" in result.stderr and "NOPE-1" not in result.stderr


def deliver(package: str, pacs: Orthanc, who: Side) -> dict:
    result = emix(
        "dimse",
        "deliver",
        package,
        "--pacs",
        pacs.dicom_address,
        "--json",
        env=who.env,
        check=False,
    )
    answer = json.loads(result.stdout)
    answer["exit"] = result.returncode
    return answer


def stored_files(pacs: Orthanc, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for index, instance in enumerate(pacs.get("/instances").json()):
        path = folder / f"{index}.dcm"
        path.write_bytes(pacs.get(f"/instances/{instance}/file").content)
        out.append(path)
    return out


def test_deliver_stores_every_instance_in_its_own_syntax(
    moved, files, exchange, orthanc_factory, tmp_path
):
    pacs2 = orthanc_factory("pacs2", dicom=True)
    answer = deliver(moved["package"], pacs2, exchange.lakeside)
    assert answer["exit"] == 0, answer
    assert (answer["stored"], answer["failed"], answer["decompressed"]) == (len(files), 0, 0)
    assert by_sop(stored_files(pacs2, tmp_path)) == by_sop(files)
    # twice is harmless
    again = deliver(moved["package"], pacs2, exchange.lakeside)
    assert again["exit"] == 0 and again["stored"] == len(files)
    assert len(pacs2.get("/instances").json()) == len(files)


def test_deliver_decompresses_only_what_the_pacs_refuses_and_says_so(
    moved, files, exchange, orthanc_factory
):
    uncompressed_only = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]
    pacs3 = orthanc_factory("pacs3", dicom=True, AcceptedTransferSyntaxes=uncompressed_only)
    answer = deliver(moved["package"], pacs3, exchange.lakeside)
    syntax = {
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: pydicom.dcmread(
            p, stop_before_pixels=True
        ).file_meta.TransferSyntaxUID
        for p in files
    }
    for outcome in answer["instances"]:
        original = syntax[outcome["sop_instance_uid"]]
        if original in uncompressed_only:
            assert outcome["status"] == "stored" and "reason" not in outcome, outcome
        elif outcome["status"] == "stored":
            assert outcome["transfer_syntax"] == "1.2.840.10008.1.2.1"
            assert "decompressed to Explicit VR Little Endian" in outcome["reason"]
        else:  # no decoder here for this syntax: said so, never silently dropped
            assert "cannot be decompressed here" in outcome["reason"], outcome
    rle = [o for o in answer["instances"] if syntax[o["sop_instance_uid"]] == "1.2.840.10008.1.2.5"]
    assert rle and all(o["status"] == "stored" for o in rle)
    assert answer["decompressed"] >= len(rle)
    assert len(pacs3.get("/instances").json()) == answer["stored"]
