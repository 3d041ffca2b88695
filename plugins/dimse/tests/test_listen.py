"""``emix dimse listen`` against dcmtk: a modality pushes, the recipient gets the study
with every dataset byte identical; unknown callers are rejected; everything is audited."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from emix_core import LocalHome
from plugins.dimse.tests.helpers import (
    DCMTK,
    as_dcmtk_sends,
    dataset_bytes,
    echoscu,
    inbox,
    received_files,
    storescu,
    wait_for,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not DCMTK, reason="needs dcmtk (bash .ci/system-deps)"),
]

#: pydicom's bundled compressed files, and the storescu option proposing their syntax
COMPRESSED = {
    "SC_rgb_jpeg_dcmtk.dcm": "-xy",  # JPEG baseline
    "JPEG2000.dcm": "-xw",  # JPEG 2000
    "MR_small_RLE.dcm": "-xr",  # RLE lossless
    "MR_small_jpeg_ls_lossless.dcm": "-xt",  # JPEG-LS lossless
}


def audit_events(home) -> list[dict]:
    return LocalHome(home).audit_log.events(limit=None, include_phi=True)


def test_echoscu_gets_an_answer_and_the_association_is_audited(listeners):
    listener = listeners("mercy", "--to", "lakeside")
    result = echoscu(listener.port)
    assert result.returncode == 0, result.stderr
    listener.stop()
    events = audit_events(listener.home)
    echo = [e for e in events if e["event_type"] == "user-authentication"]
    assert echo and echo[-1]["actor"] == "dicom:MODALITY" and echo[-1]["source"] == "127.0.0.1"


def test_unknown_calling_ae_and_wrong_host_are_rejected(listeners):
    listener = listeners(
        "mercy", "--to", "lakeside", "--allow", "CT_ROOM_1", "--allow", "PACS@192.0.2.10"
    )
    assert echoscu(listener.port, calling="CT_ROOM_1").returncode == 0
    stranger = echoscu(listener.port, calling="STRANGER")
    assert stranger.returncode != 0
    assert "Calling AE Title Not Recognized" in stranger.stdout + stranger.stderr
    # the right AE title from the wrong host is a stranger too
    wrong_host = echoscu(listener.port, calling="PACS")
    assert "Calling AE Title Not Recognized" in wrong_host.stdout + wrong_host.stderr
    # and calling the listener by another name is refused
    assert echoscu(listener.port, calling="CT_ROOM_1", called="OTHER").returncode != 0
    assert listener.alive()
    listener.stop()
    alerts = [e for e in audit_events(listener.home) if e["event_type"] == "security-alert"]
    assert {a["actor"] for a in alerts} >= {"dicom:STRANGER", "dicom:PACS"}
    assert all(a["outcome"] == 4 for a in alerts)


def test_listener_without_allowlist_warns(listeners):
    listener = listeners("mercy", "--to", "lakeside")
    assert "dimse.listener.open_to_any_caller" in listener.log_text()


def test_compressed_instances_cross_with_identical_datasets(listeners, lakeside, tmp_path):
    listener = listeners("mercy", "--to", "lakeside", "--settle", "1")
    sources = [Path(get_testdata_file(name)) for name in COMPRESSED]
    files = as_dcmtk_sends(sources, tmp_path / "sent")
    for path, option in zip(files, COMPRESSED.values(), strict=True):
        # storescu proposes the file's own compressed syntax only: no conversion on the way
        result = storescu(listener.port, [path], extra=[option, "-R"])
        assert result.returncode == 0, result.stdout + result.stderr
    packages = wait_for(lambda: inbox(lakeside.env), 30, "the package in lakeside's inbox")
    assert len(packages) == 1 and packages[0]["items"] == len(files)
    got = received_files(packages[0]["id"], tmp_path / "received", lakeside.env)
    assert sorted(dataset_bytes(f) for f in got) == sorted(dataset_bytes(f) for f in files)
    syntaxes = {pydicom.dcmread(f).file_meta.TransferSyntaxUID for f in got}
    assert syntaxes == {pydicom.dcmread(f).file_meta.TransferSyntaxUID for f in sources}
    assert len(syntaxes) == 4


def test_kill_9_loses_nothing_acknowledged_and_sends_nothing_twice(listeners, lakeside, tmp_path):
    import subprocess

    from emix_core import generate_study

    files = generate_study(
        tmp_path / "ct",
        slices=80,
        series=1,
        rows=256,
        columns=256,
        patient_name="TEST^KILL",
        patient_id="PID-KILL-9",
        accession_number="ACC-KILL-9",
    )
    listener = listeners("mercy", "--to", "lakeside", "--settle", "2")
    # 1. killed in the middle of an association
    modality = subprocess.Popen(
        ["storescu", "-aet", "MODALITY", "-aec", "EMIX", "127.0.0.1", str(listener.port)]
        + [str(f) for f in files],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: listener.spooled() >= 10, 60, "ten acknowledged instances")
    listener.kill()
    modality.wait(timeout=60)
    acknowledged = listener.spooled()
    assert 10 <= acknowledged < len(files)
    listener.start()
    # the modality sends the study again, as it does after a failed transfer
    result = storescu(listener.port, files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert listener.spooled() == len(files)  # acknowledged twice, kept once
    # 2. killed while the study is being sent to the hub
    wait_for(lambda: listener.batches(), 30, "the study to leave")
    listener.kill()
    listener.start()
    packages = wait_for(lambda: inbox(lakeside.env), 60, "the package in lakeside's inbox")
    wait_for(lambda: "sent" in listener.batches(), 30, "the batch to be journaled as sent")
    assert listener.batches() == ["sent"], listener.log_text()[-3000:]
    time.sleep(3)  # a second package would show by now
    packages = inbox(lakeside.env)
    assert len(packages) == 1, packages
    assert packages[0]["items"] == len(files)
    got = received_files(packages[0]["id"], tmp_path / "received", lakeside.env)
    assert sorted(dataset_bytes(f) for f in got) == sorted(dataset_bytes(f) for f in files)
    assert listener.spooled() == 0
    assert not any((listener.home / "dimse-listen").glob("dimse-*/instances/*"))


def test_send_on_association_end_does_not_wait_for_the_settle_time(listeners, lakeside):
    listener = listeners(
        "mercy", "--to", "lakeside", "--send-on", "association-end", "--settle", "3600"
    )
    files = [Path(get_testdata_file(n)) for n in ("CT_small.dcm", "MR_small.dcm")]
    result = storescu(listener.port, files)
    assert result.returncode == 0, result.stdout + result.stderr
    packages = wait_for(lambda: inbox(lakeside.env), 30, "the package once the association ended")
    assert sum(p["items"] for p in packages) == 2
