"""Reading a patient's medium: real disc images, zips and folders, good and hostile."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pydicom.data
import pytest
from discs import pycdlib_iso, rewrite_dicomdir, xorriso_iso
from emix_cd_import.catalog import build_catalog
from emix_cd_import.dicomdir import file_id_path
from emix_cd_import.media import Limits, match_key, open_medium

from emix_core import InvalidInput, PayloadTooLarge, UnsafePathError, get_plugin_manager
from emix_core.testing import emix, emix_json

ALL = {"patients": 2, "studies": 6, "series": 13, "instances": 31}


def inspect(source: Path, limits: Limits | None = None) -> dict:
    with open_medium(source, limits) as medium:
        return build_catalog(medium, limits).to_dict()


def counts(data: dict) -> dict:
    return {k: data["counts"][k] for k in ALL}


def codes(data: dict) -> list[str]:
    return sorted(p["code"] for p in data["problems"])


# --------------------------------------------------------------------------- good media


@pytest.mark.e2e  # runs the command line in a child process
def test_pycdlib_iso_of_the_dicomdir_test_set_lists_every_study(cd_folder, tmp_path):
    data = emix_json("cd", "inspect", str(pycdlib_iso(cd_folder, tmp_path / "cd.iso")))
    assert data["kind"] == "iso" and data["dicomdir"] is True
    assert counts(data) == ALL
    assert data["problems"] == []
    peter = next(p for p in data["patients"] if p["patient_id"] == "98890234")
    brain_mra = next(s for s in peter["studies"] if s["description"] == "Brain-MRA")
    assert brain_mra["instances"] == 11 and len(brain_mra["series"]) == 3


def test_xorriso_image_with_rock_ridge_and_joliet_reads_the_same(cd_folder, tmp_path):
    # ISO 9660 names there are "6154.;1" in upper case; the DICOMDIR names "6154"
    data = inspect(xorriso_iso(cd_folder, tmp_path / "burnt.iso"))
    assert counts(data) == ALL and data["problems"] == []


def test_joliet_names_are_used_when_there_is_no_rock_ridge(series_300, tmp_path):
    # generated names ("slice-0001.dcm") are not ISO 9660 Level 1 names: only Joliet has them
    iso = pycdlib_iso(series_300, tmp_path / "joliet.iso", joliet=True)
    with open_medium(iso) as medium:
        paths = sorted(f.path for f in medium.files)
    assert paths[0] == "series-01/slice-0001.dcm" and len(paths) == 300


def test_mounted_folder_and_zip_read_the_same(cd_folder, tmp_path):
    assert counts(inspect(cd_folder)) == ALL
    archive = tmp_path / "cd.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(cd_folder.rglob("*")):
            zf.write(path, path.relative_to(cd_folder).as_posix())
    data = inspect(archive)
    assert data["kind"] == "zip" and counts(data) == ALL and data["problems"] == []


def test_raw_2352_byte_sector_image_is_read_like_an_iso(cd_folder, tmp_path):
    iso = pycdlib_iso(cd_folder, tmp_path / "cd.iso").read_bytes()
    raw = bytearray()
    for start in range(0, len(iso), 2048):  # mode 1: sync, header, data, EDC/ECC
        raw += b"\x00" + b"\xff" * 10 + b"\x00" + b"\x00\x02\x00\x01" + iso[start : start + 2048]
        raw += b"\x00" * 288
    (tmp_path / "cd.bin").write_bytes(bytes(raw))
    data = inspect(tmp_path / "cd.bin")
    assert data["kind"] == "raw-disc-image" and counts(data) == ALL


def test_disc_without_dicomdir_is_scanned(series_300, tmp_path):
    data = inspect(pycdlib_iso(series_300, tmp_path / "nodir.iso", rock_ridge=True))
    assert data["dicomdir"] is False
    assert data["counts"]["instances"] == 300 and data["counts"]["series"] == 1
    assert data["patients"][0]["patient_id"] == "EXT-55-0917"


def test_matching_strips_versions_and_trailing_dots_case_insensitively():
    assert match_key("/dicom/im000001.;1") == match_key("DICOM/IM000001")
    assert match_key("DICOM/REPORT.PDF;1") == "DICOM/REPORT.PDF"


def test_autorun_and_viewer_programs_are_reported_never_copied(cd_folder, tmp_path):
    (cd_folder / "AUTORUN.INF").write_text("[autorun]\nopen=VIEWER.EXE\n")
    (cd_folder / "VIEWER.EXE").write_bytes(b"MZ" + bytes(510))
    (cd_folder / "VIEWER").mkdir()
    (cd_folder / "VIEWER" / "CORE.DLL").write_bytes(b"MZ" + bytes(510))
    data = inspect(pycdlib_iso(cd_folder, tmp_path / "cd.iso"))
    assert sorted(data["programs"]) == ["AUTORUN.INF", "VIEWER.EXE", "VIEWER/CORE.DLL"]
    assert codes(data) == ["programs"] and counts(data) == ALL
    with open_medium(tmp_path / "cd.iso") as medium:
        assert not any("EXE" in f.path or "DLL" in f.path for f in medium.files)


@pytest.mark.e2e  # runs the command line in a child process
def test_human_output_lists_patients_studies_and_series(cd_folder):
    out = emix("cd", "inspect", str(cd_folder)).stdout
    assert "2 patients, 6 studies, 13 series, 31 instances, read from its DICOMDIR" in out
    assert "Doe^Archibald" in out and "Brain-MRA" in out


# --------------------------------------------------------------------------- hostile DICOMDIRs


def _first(records, kind):
    return next(r for r in records if r.DirectoryRecordType == kind)


@pytest.mark.parametrize(
    ("file_id", "reason"),
    [
        (["..", "..", "etc", "passwd"], "climbs out"),
        (["/etc/passwd"], "separator"),
        (["C:", "WINDOWS", "SYSTEM32"], "drive"),
        (["A", "B", "C", "D", "E", "F", "G", "H", "I"], "9 components"),
    ],
)
def test_unsafe_referenced_file_ids_are_refused_and_the_rest_imported(
    cd_folder, tmp_path, file_id, reason
):
    def change(ds, records, overrides):
        _first(records, "IMAGE").ReferencedFileID = file_id

    rewrite_dicomdir(cd_folder / "DICOMDIR", change)
    data = inspect(pycdlib_iso(cd_folder, tmp_path / "cd.iso"))
    unsafe = [p for p in data["problems"] if p["code"] == "unsafe-path"]
    assert len(unsafe) == 1 and reason in unsafe[0]["message"]
    # the file that record named is still found by scanning; nothing outside is read
    assert data["counts"]["instances"] == 31


def test_file_id_check_itself():
    assert file_id_path(["DICOM", "IM1"]) == "DICOM/IM1"
    for bad in (["..", "x"], ["a\\b"], ["/abs"], ["x"] * 9, [""], ["C:"]):
        with pytest.raises(UnsafePathError):
            file_id_path(bad)


def test_dicomdir_offsets_that_loop_are_cut(cd_folder, tmp_path):
    def change(ds, records, overrides):
        patients = [i for i, r in enumerate(records) if r.DirectoryRecordType == "PATIENT"]
        images = [r for r in records if r.DirectoryRecordType == "IMAGE"]
        overrides[(id(records[patients[-1]]), "OffsetOfTheNextDirectoryRecord")] = patients[0]
        overrides[(id(images[-1]), "OffsetOfTheNextDirectoryRecord")] = records.index(images[-1])

    rewrite_dicomdir(cd_folder / "DICOMDIR", change)
    data = inspect(pycdlib_iso(cd_folder, tmp_path / "cd.iso"))
    assert "dicomdir-loop" in codes(data)
    assert counts(data) == ALL


def test_dicomdir_offsets_past_the_end_lose_only_their_branch(cd_folder, tmp_path):
    def change(ds, records, overrides):
        series = _first(records, "SERIES")
        overrides[(id(series), "OffsetOfReferencedLowerLevelDirectoryEntity")] = ("raw", 0x7FFFFFF0)

    rewrite_dicomdir(cd_folder / "DICOMDIR", change)
    data = inspect(pycdlib_iso(cd_folder, tmp_path / "cd.iso"))
    assert "dicomdir-bad-offset" in codes(data)
    assert "not-in-dicomdir" in codes(data)  # the lost branch's file, found by scanning
    assert counts(data) == ALL


def test_files_the_dicomdir_names_but_missing_are_reported(cd_folder, tmp_path):
    victim = next(p for p in sorted((cd_folder / "77654033").rglob("*")) if p.is_file())
    victim.unlink()
    data = inspect(pycdlib_iso(cd_folder, tmp_path / "cd.iso"))
    missing = [p for p in data["problems"] if p["code"] == "missing-file"]
    assert len(missing) == 1
    assert match_key(missing[0]["where"]) == match_key(victim.relative_to(cd_folder).as_posix())
    assert data["counts"]["instances"] == 30


def test_dicomdir_listing_a_patient_the_files_do_not_hold(cd_folder, tmp_path):
    def change(ds, records, overrides):
        _first(records, "PATIENT").PatientID = "NOT-ON-DISC"

    rewrite_dicomdir(cd_folder / "DICOMDIR", change)
    data = inspect(pycdlib_iso(cd_folder, tmp_path / "cd.iso"))
    mismatched = [p for p in data["problems"] if p["code"] == "dicomdir-mismatch"]
    assert len(mismatched) == 7  # Doe^Archibald's files: left out
    assert data["counts"]["instances"] == 24
    assert {p["patient_id"] for p in data["patients"]} == {"98890234"}


def test_unreadable_dicomdir_falls_back_to_scanning(cd_folder, tmp_path):
    (cd_folder / "DICOMDIR").write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 300)
    data = inspect(cd_folder)
    assert "dicomdir-unreadable" in codes(data)
    assert counts(data) == ALL


# --------------------------------------------------------------------------- hostile media


def test_rock_ridge_symlink_to_outside_is_not_followed(cd_folder, tmp_path):
    iso = pycdlib_iso(
        cd_folder, tmp_path / "cd.iso", rock_ridge=True, symlinks={"passwd": "../../etc/passwd"}
    )
    data = inspect(iso)
    links = [p for p in data["problems"] if p["code"] == "link"]
    assert len(links) == 1 and "outside the disc" in links[0]["message"]
    assert counts(data) == ALL


def test_links_in_a_mounted_folder_are_not_followed(cd_folder, tmp_path):
    secret = tmp_path / "secret.dcm"
    shutil.copy(pydicom.data.get_testdata_file("CT_small.dcm"), secret)
    os.symlink(secret, cd_folder / "LINKED")
    os.symlink(tmp_path, cd_folder / "UP")
    data = inspect(cd_folder)
    assert codes(data).count("link") == 2 and counts(data) == ALL


def test_zip_slip_entries_are_refused_and_the_good_ones_read(cd_folder, tmp_path):
    archive = tmp_path / "slip.zip"
    ct = Path(pydicom.data.get_testdata_file("CT_small.dcm")).read_bytes()
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(cd_folder.rglob("*")):
            zf.write(path, path.relative_to(cd_folder).as_posix())
        zf.writestr("../../evil.dcm", ct)
        zf.writestr("/etc/evil.dcm", ct)
        zf.writestr("..\\..\\evil.dcm", ct)
        zf.writestr("C:/evil.dcm", ct)
    data = inspect(archive)
    assert codes(data).count("unsafe-path") == 4
    assert counts(data) == ALL
    assert not (tmp_path.parent / "evil.dcm").exists()


def test_zip_bomb_entry_is_refused_by_its_ratio(cd_folder, tmp_path):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(cd_folder.rglob("*")):
            zf.write(path, path.relative_to(cd_folder).as_posix())
        with zf.open("BOMB", "w", force_zip64=True) as entry:
            block = bytes(1024 * 1024)
            for _ in range(64):
                entry.write(block)
    data = inspect(archive)
    assert "zip-bomb" in codes(data) and counts(data) == ALL


def test_zip_over_the_total_size_cap_is_refused(cd_folder, tmp_path):
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(cd_folder.rglob("*")):
            zf.write(path, path.relative_to(cd_folder).as_posix())
    with pytest.raises(PayloadTooLarge, match="unpacks to more than"):
        inspect(archive, Limits(max_total_bytes=100_000))  # the set unpacks to ~140 kB


@pytest.mark.e2e  # runs the command line in a child process
def test_a_file_that_is_not_an_iso_is_refused_clearly(tmp_path):
    fake = tmp_path / "holiday.iso"
    fake.write_bytes(os.urandom(200_000))
    with pytest.raises(InvalidInput, match="not a disc image"):
        open_medium(fake)
    result = emix("cd", "inspect", str(fake), "--json", check=False)
    assert result.returncode == 1 and '"error": "invalid_input"' in result.stdout


def test_a_damaged_iso_is_refused_clearly(cd_folder, tmp_path):
    iso = pycdlib_iso(cd_folder, tmp_path / "cd.iso")
    damaged = tmp_path / "damaged.iso"
    data = bytearray(iso.read_bytes()[: 19 * 2048])
    data[16 * 2048 + 156 : 16 * 2048 + 190] = os.urandom(34)  # the root directory record
    damaged.write_bytes(bytes(data))
    with pytest.raises(InvalidInput, match="damaged"):
        open_medium(damaged)


@pytest.mark.e2e  # runs the command line in a child process
def test_a_4_gb_sparse_iso_is_read_with_little_memory(cd_folder, tmp_path):
    iso = pycdlib_iso(cd_folder, tmp_path / "big.iso")
    with open(iso, "r+b") as fp:
        fp.truncate(4 * 1024**3)  # sparse: 4 GB long, a few MB on disk
    zeros = tmp_path / "zeros.iso"
    with open(zeros, "wb") as fp:
        fp.truncate(4 * 1024**3)
    code = (
        "import json, sys\n"
        "from emix_cd_import.media import open_medium\n"
        "from emix_cd_import.catalog import build_catalog\n"
        "with open_medium(sys.argv[1]) as m:\n"
        "    n = len(build_catalog(m).instances)\n"
        "try:\n"
        "    open_medium(sys.argv[2])\n"
        "except Exception as exc:\n"
        "    refused = type(exc).__name__\n"
        # VmHWM is this process's own peak; ru_maxrss would include the parent's (pytest's)
        # resident size, which Linux carries across fork and exec.
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
        "print(json.dumps([n, refused, int(hwm.split()[1])]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(iso), str(zeros)], capture_output=True, text=True
    )
    instances, refused, max_rss_kib = __import__("json").loads(out.stdout)
    assert instances == 31 and refused == "InvalidInput"
    assert max_rss_kib < 200 * 1024, f"peak memory {max_rss_kib / 1024:.0f} MiB"


# --------------------------------------------------------------------------- the hook


def test_reconcile_hook_default_maps_an_explicit_id_and_a_plugin_overrides_it():
    from emix_core import hookimpl, hooks_for

    pm = get_plugin_manager()
    hooks = hooks_for(pm)
    foreign = {"PatientID": "EXT-1", "PatientName": "A^B"}
    assert hooks.reconcile_patient(foreign, "MRN-9", "cd") == {"PatientID": "MRN-9"}
    assert hooks.reconcile_patient(foreign, None, "cd") == {}

    class MasterPatientIndex:
        @hookimpl
        def emix_reconcile_patient(self, patient, local_patient_id, source):
            if patient["PatientID"] == "EXT-1":
                return {"PatientID": "MRN-FROM-MPI", "IssuerOfPatientID": "MERCY"}
            return None

    pm.register(MasterPatientIndex(), name="mpi")
    assert hooks.reconcile_patient(foreign, None, "cd") == {
        "PatientID": "MRN-FROM-MPI",
        "IssuerOfPatientID": "MERCY",
    }
    other = {"PatientID": "EXT-2"}
    assert hooks.reconcile_patient(other, "MRN-7", "cd") == {"PatientID": "MRN-7"}


# --------------------------------------------------------------------------- links in folders


def test_a_folder_emix_received_reads_cleanly_through_its_dicomdir(hub_server, tmp_path):
    from emix_core import generate_study, receive_package, send_paths

    study = tmp_path / "study"
    generated = generate_study(study, slices=3, series=2, rows=64, columns=64)
    mercy, mercy_client = hub_server.facility_home(tmp_path, "mercy")
    lakeside, lakeside_client = hub_server.facility_home(tmp_path, "lakeside")
    sent = send_paths([study], ["lakeside"], client=mercy_client, home=mercy)
    folder = receive_package(
        sent.package_id, tmp_path / "in", client=lakeside_client, home=lakeside
    ).path
    assert any(p.is_symlink() for p in (folder / "DIRLINKS").rglob("*"))
    data = inspect(folder)
    assert data["problems"] == []  # no link, missing-file or not-in-dicomdir noise
    assert data["dicomdir"] is True
    assert data["counts"]["instances"] == len(generated)
    assert data["counts"]["series"] == 2
    shown = emix("cd", "inspect", str(folder))
    assert "link" not in shown.stdout + shown.stderr and "problem" not in shown.stdout.lower()


def test_links_out_of_a_folder_are_still_refused(cd_folder, tmp_path):
    secret = tmp_path / "outside.dcm"
    shutil.copy(pydicom.data.get_testdata_file("CT_small.dcm"), secret)
    (cd_folder / "OUTSIDE").symlink_to(secret)
    (cd_folder / "UP").symlink_to(tmp_path, target_is_directory=True)
    (cd_folder / "ROOT").symlink_to(cd_folder, target_is_directory=True)
    (cd_folder / "GONE").symlink_to(tmp_path / "nothing-here")
    data = inspect(cd_folder)
    links = sorted(p["where"] for p in data["problems"] if p["code"] == "link")
    assert links == ["GONE", "OUTSIDE", "ROOT", "UP"]
    assert counts(data) == ALL  # the CT behind the link was not read


def test_a_link_inside_the_folder_is_read_as_its_file(cd_folder):
    image = next(p for p in sorted((cd_folder / "77654033").rglob("*")) if p.is_file())
    (cd_folder / "ALIAS").symlink_to(image)
    (cd_folder / "SAME").symlink_to(cd_folder / "77654033", target_is_directory=True)
    data = inspect(cd_folder)
    assert "link" not in codes(data)
    assert counts(data) == ALL  # read once, not twice
