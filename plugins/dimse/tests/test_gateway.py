"""Gateway source and destination of kind ``dimse``: facility A's PACS pushes a study
to A's gateway, which routes it by calling AE title (or a rule on the data set) to
facility B, whose gateway stores it into B's PACS with every dataset byte identical."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from emix_core.testing import free_port, make_sample_study, needs_orthanc
from plugins.dimse.tests.helpers import (
    DCMTK,
    GatewayProcess,
    as_dcmtk_sends,
    dataset_bytes,
    gateway_config,
    inbox,
    storescu,
    wait_for,
)

pytestmark = [
    pytest.mark.e2e,
    needs_orthanc,
    pytest.mark.skipif(not DCMTK, reason="needs dcmtk (bash .ci/system-deps)"),
]


@pytest.fixture
def gateways() -> Iterator[list[GatewayProcess]]:
    made: list[GatewayProcess] = []
    try:
        yield made
    finally:
        for gateway in made:
            gateway.stop()


def by_sop(paths: list[Path]) -> dict[str, bytes]:
    return {
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: dataset_bytes(p) for p in paths
    }


def test_pacs_to_pacs_through_dimse_gateways(
    hub, mercy, lakeside, orthanc_factory, gateways, tmp_path
):
    port = free_port()
    source = f"""[[sources]]
kind = "dimse"
name = "pacs-push"
ae_title = "EMIX"
port = {port}
host = "127.0.0.1"
allow = ["ORTHANC@127.0.0.1", "MODALITY"]
settle_seconds = 1

[[sources.routes]]
calling_ae = "ORTHANC"
to = "lakeside"

[[sources.routes]]
match = {{ Modality = "MR" }}
to = "lakeside"
"""
    pacs_b = orthanc_factory("pacs-b", dicom=True)
    destination = f"""[[destinations]]
kind = "dimse"
name = "pacs"
pacs = "{pacs_b.dicom_address}"
calling_ae = "EMIX_LAKESIDE"
"""
    gateway_a = GatewayProcess(tmp_path / "a", gateway_config(hub, "mercy", source)).start()
    gateways.append(gateway_a)
    gateway_b = GatewayProcess(tmp_path / "b", gateway_config(hub, "lakeside", destination))
    gateways.append(gateway_b.start())
    gateway_a.wait_listening()

    study = make_sample_study(
        tmp_path / "study", accession="ACC-GW-DIMSE", patient_id="PID-GW-DIMSE", slices=10
    )
    files = as_dcmtk_sends(study.files, tmp_path / "wire", study_uid=study.study_uid)
    pacs_a = orthanc_factory("pacs-a", dicom=True, modalities={"emix": ("EMIX", "127.0.0.1", port)})
    for path in files:
        pacs_a.upload(path)
    [study_id] = pacs_a.get("/studies").json()
    answer = pacs_a.post("/modalities/emix/store", {"Resources": [study_id], "Synchronous": True})
    assert answer.ok, answer.text

    wait_for(
        lambda: len(pacs_b.get("/instances").json()) >= len(files),
        90,
        "the study in facility B's PACS",
    )
    stored = []
    for index, instance in enumerate(pacs_b.get("/instances").json()):
        path = tmp_path / "b-stored" / f"{index}.dcm"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(pacs_b.get(f"/instances/{instance}/file").content)
        stored.append(path)
    assert by_sop(stored) == by_sop(files)

    # a modality's CT matches no route: refused, so the modality keeps it
    ct = Path(get_testdata_file("CT_small.dcm"))
    refused = storescu(port, [ct], calling="MODALITY")
    assert refused.returncode != 0
    wait_for(lambda: "no route" in gateway_a.log_text(), 10, "the refusal in the log")
    # its MR matches the rule on the data set: routed to lakeside
    mr = Path(get_testdata_file("MR_small.dcm"))
    assert storescu(port, [mr], calling="MODALITY").returncode == 0
    wait_for(
        lambda: len(pacs_b.get("/instances").json()) == len(files) + 1, 60, "the MR in B's PACS"
    )
    assert len(inbox(lakeside.env)) == 2
    status = gateway_a.log_text()
    assert "package.sent" in status and "dimse.store.refused" in status
