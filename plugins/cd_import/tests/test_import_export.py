"""A patient's disc imported through a real hub and into a real Orthanc; a received
package exported as IHE PDI media and read back with pydicom and dcmtk."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pydicom
import pytest
from discs import FOREIGN_ID, pycdlib_iso, xorriso_iso
from pydicom.fileset import FileSet

from emix_core import write_sample_report_pdf
from emix_core.testing import emix, emix_json

pytestmark = pytest.mark.e2e


def sop_uids(folder: Path) -> set[str]:
    return {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for p in folder.rglob("*.dcm")
    }


def pixel_digests(files: list[Path]) -> dict[str, str]:
    out = {}
    for path in files:
        ds = pydicom.dcmread(path)
        out[str(ds.SOPInstanceUID)] = hashlib.sha256(ds.PixelData).hexdigest()
    return out


def test_a_patient_cd_is_shared_with_another_facility(cd_folder, tmp_path, mercy, lakeside):
    (cd_folder / "AUTORUN.INF").write_text("[autorun]\nopen=VIEWER.EXE\n")
    (cd_folder / "VIEWER.EXE").write_bytes(b"MZ" + bytes(510))
    iso = xorriso_iso(cd_folder, tmp_path / "patient.iso")
    result = emix_json("cd", "import", str(iso), "--to", "lakeside", env=mercy.env)
    assert result["imported"] == 31 and result["package"]
    assert result["programs"] == ["AUTORUN.INF", "VIEWER.EXE"]
    emix("receive", result["package"], "--out", str(tmp_path / "in"), env=lakeside.env)
    received = tmp_path / "in" / result["package"]
    expected = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for p in cd_folder.rglob("*")
        if p.is_file() and p.parent != cd_folder
    }
    assert sop_uids(received) == expected
    assert not [p for p in received.rglob("*") if p.suffix.upper() in (".EXE", ".INF")]


def test_local_patient_id_is_written_and_the_foreign_one_kept(
    series_300, tmp_path, mercy, lakeside
):
    iso = pycdlib_iso(series_300, tmp_path / "foreign.iso", rock_ridge=True)
    result = emix_json(
        "cd", "import", str(iso), "--to", "lakeside", "--patient-id", "MRN-0042", env=mercy.env
    )
    assert result["imported"] == 300 and result["reconciled"] == 300
    assert result["problems"] == []
    emix("receive", result["package"], "--out", str(tmp_path / "in"), env=lakeside.env)
    received = sorted((tmp_path / "in" / result["package"]).rglob("*.dcm"))
    assert len(received) == 300
    for path in received[::37]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.PatientID == "MRN-0042"
        assert [o.PatientID for o in ds.OtherPatientIDsSequence] == [FOREIGN_ID]
        assert ds.PatientName == "FOREIGN^PATIENT"
    originals = sorted(series_300.rglob("*.dcm"))
    assert pixel_digests(received) == pixel_digests(originals)


def test_one_local_id_for_a_disc_of_two_patients_is_refused(cd_folder, tmp_path, mercy):
    out = emix(
        "cd", "import", str(cd_folder), "--to", "lakeside", "--patient-id", "MRN-1",
        env=mercy.env, check=False,
    )  # fmt: skip
    assert out.returncode == 1
    assert "holds 2 patients" in out.stderr
    out = emix(
        "cd", "import", str(cd_folder), "--to", "lakeside", "--patient-id", "MRN\\1",
        env=mercy.env, check=False,
    )  # fmt: skip
    assert out.returncode == 2 and "without backslash" in out.stderr


def test_disc_imported_into_orthanc_with_damage_reported(cd_folder, tmp_path, orthanc_factory):
    pacs = orthanc_factory("cd-pacs")
    victim = next(p for p in sorted((cd_folder / "98892001").rglob("*")) if p.is_file())
    victim_uid = str(pydicom.dcmread(victim, stop_before_pixels=True).SOPInstanceUID)
    victim.unlink()
    iso = pycdlib_iso(cd_folder, tmp_path / "damaged.iso")
    env = {"EMIX_HOME": str(tmp_path / "home")}
    out = emix("cd", "import", str(iso), "--pacs", pacs.url, "--json", env=env, check=False)
    assert out.returncode == 1  # something was wrong: the operator must look
    import json

    result = json.loads(out.stdout)
    assert result["imported"] == 30 and result["pacs"]["verified"] is True
    assert [p["code"] for p in result["problems"]] == ["missing-file"]
    stored = pacs.sop_instance_uids()
    assert len(stored) == 30 and victim_uid not in stored


def test_received_package_exported_as_pdi_disc_reads_back(series_300, tmp_path, mercy, lakeside):
    report = tmp_path / "report.pdf"
    write_sample_report_pdf(
        report,
        facility="Mercy General",
        accession_number="EXT-ACC-1",
        patient_name="FOREIGN^PATIENT",
        findings="No acute abnormality.",
        impression="Normal study.",
    )
    sent = emix_json("send", str(series_300), str(report), "--to", "lakeside", env=mercy.env)
    emix("receive", sent["package"], "--out", str(tmp_path / "in"), env=lakeside.env)
    package = tmp_path / "in" / sent["package"]
    iso = tmp_path / "out" / "patient.iso"
    iso.parent.mkdir()
    data = emix_json("cd", "export", str(package), "--iso", str(iso))
    assert data["instances"] == 300 and data["documents"] >= 1

    # the disc, as a viewer or another import station would read it
    again = emix_json("cd", "inspect", str(iso))
    assert again["dicomdir"] is True and again["problems"] == []
    assert again["counts"]["instances"] == 300

    # its content, extracted with another tool, and checked with pydicom and dcmtk
    disc = tmp_path / "disc"
    subprocess.run(
        ["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract", "/", str(disc)],
        check=True,
        capture_output=True,
    )
    names = sorted(p.relative_to(disc).as_posix() for p in disc.rglob("*") if p.is_file())
    assert {"DICOMDIR", "INDEX.HTM", "README.TXT"} <= set(names)
    images = [n for n in names if n.startswith("DICOM/")]
    assert len(images) == 300
    assert all(len(part) <= 8 for n in images for part in n.split("/"))
    assert any(n.startswith("DOCS/") and n.endswith(".PDF") for n in names)
    fs = FileSet(disc / "DICOMDIR")
    assert len(fs) == 300
    assert {str(i.SOPInstanceUID) for i in fs} == sop_uids(series_300)
    assert fs.find(PatientID=FOREIGN_ID)[0].load().pixel_array.shape == (512, 512)
    dump = subprocess.run(["dcmdump", "-q", str(disc / "DICOMDIR")], capture_output=True, text=True)
    assert dump.returncode == 0 and dump.stdout.count("ReferencedFileID") == 300
    check = subprocess.run(
        ["dcmftest", *[str(disc / n) for n in images[:50]]], capture_output=True, text=True
    )
    assert check.returncode == 0 and check.stdout.count("yes:") == 50
    # dcmmkdir refuses file names outside the General Purpose CD-R profile
    rebuilt = subprocess.run(
        ["dcmmkdir", "+id", str(disc), "+D", str(tmp_path / "DICOMDIR.rebuilt"), "+r", "DICOM"],
        capture_output=True,
        text=True,
    )
    assert rebuilt.returncode == 0, rebuilt.stderr
    # straight from the inbox, by package id: received, written, the download removed
    usb = tmp_path / "usb"
    data = emix_json("cd", "export", sent["package"], "--folder", str(usb), env=lakeside.env)
    assert data["instances"] == 300 and (usb / "DICOMDIR").is_file()
    assert len(FileSet(usb / "DICOMDIR")) == 300
    assert not any((lakeside.home / "tmp").iterdir())
    readme = (disc / "README.TXT").read_text()
    assert "DICOM" in readme and "Nothing on this disc runs by itself" in readme
    assert "<table" in (disc / "INDEX.HTM").read_text()
