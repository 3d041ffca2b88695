"""A PACS pushes a study to ``emix dimse listen`` ("send to destination" in Orthanc):
the recipient facility gets one package with every dataset byte identical."""

from __future__ import annotations

import pydicom
import pytest

from emix_core.testing import make_sample_study, needs_orthanc
from plugins.dimse.tests.helpers import (
    DCMTK,
    as_dcmtk_sends,
    dataset_bytes,
    inbox,
    received_files,
    wait_for,
)

pytestmark = [
    pytest.mark.e2e,
    needs_orthanc,
    pytest.mark.skipif(not DCMTK, reason="needs dcmtk (bash .ci/system-deps)"),
]


def test_orthanc_pushes_a_study_that_arrives_identical(
    listeners, lakeside, orthanc_factory, tmp_path
):
    listener = listeners(
        "mercy", "--to", "lakeside", "--settle", "1", "--allow", "ORTHANC@127.0.0.1"
    )
    study = make_sample_study(
        tmp_path / "study", accession="ACC-DIMSE-1", patient_id="PID-DIMSE-1", slices=8
    )
    # Orthanc sends through dcmtk: the files are encoded as dcmtk puts them on the wire
    files = as_dcmtk_sends(study.files, tmp_path / "sent", study_uid=study.study_uid)
    pacs = orthanc_factory(
        "pushing", dicom=True, modalities={"emix": ("EMIX", "127.0.0.1", listener.port)}
    )
    for path in files:
        pacs.upload(path)
    [study_id] = pacs.get("/studies").json()
    answer = pacs.post("/modalities/emix/store", {"Resources": [study_id], "Synchronous": True})
    assert answer.ok, answer.text

    packages = wait_for(lambda: inbox(lakeside.env), 60, "the study in lakeside's inbox")
    assert len(packages) == 1 and packages[0]["items"] == len(files)
    got = received_files(packages[0]["id"], tmp_path / "received", lakeside.env)
    assert sorted(dataset_bytes(f) for f in got) == sorted(dataset_bytes(f) for f in files)
    sent_syntaxes = sorted(pydicom.dcmread(f).file_meta.TransferSyntaxUID for f in files)
    assert sorted(pydicom.dcmread(f).file_meta.TransferSyntaxUID for f in got) == sent_syntaxes
