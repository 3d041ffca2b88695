"""Received folders carry a DICOMDIR, so that a viewer opens them directly.

It is written in the staging folder and appears with the rest by the same rename; odd
content (structured reports, RT objects, a PDF report, an unreadable header) never stops a
reception.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.fileset import FileSet

from emix_core import Item, generate_study, receive_package, send_paths, write_sample_report_pdf
from emix_core.content.dicomdir import record_type_of, write_received_dicomdir
from emix_core.content.layout import DICOM_MEDIA_TYPE, item_relative_path
from emix_core.testing import HubServer


def _referenced(folder: Path) -> dict[str, tuple[str, Path]]:
    """SOP Instance UID -> (record type, file) for every instance the DICOMDIR lists."""
    file_set = FileSet(pydicom.dcmread(folder / "DICOMDIR"))
    out = {}
    for instance in file_set:
        out[instance.SOPInstanceUID] = (instance.node.record_type, Path(instance.path))
    return out


def test_a_received_package_opens_by_its_dicomdir(hub_server: HubServer, tmp_path: Path) -> None:
    study = tmp_path / "study"
    files = generate_study(study, slices=4, series=2, rows=64, columns=64)
    shutil.copy(get_testdata_file("test-SR.dcm"), study / "report-sr.dcm")  # a structured report
    write_sample_report_pdf(  # a document, not DICOM
        study / "report.pdf",
        facility="Mercy General",
        accession_number="A0001",
        patient_name="DEMO^PATIENT",
        findings="No acute findings.",
        impression="Normal study.",
    )
    mercy, mercy_client = hub_server.facility_home(tmp_path, "mercy")
    lakeside, lakeside_client = hub_server.facility_home(tmp_path, "lakeside")
    sent = send_paths([study], ["lakeside"], client=mercy_client, home=mercy)
    assert sent.package_id and not sent.failed

    received = receive_package(
        sent.package_id, tmp_path / "in", client=lakeside_client, home=lakeside
    )
    folder = received.path
    assert not list((tmp_path / "in").glob(".*partial*"))
    listed = _referenced(folder)
    dicom = [(i, p) for i, p in received.items if i.media_type == DICOM_MEDIA_TYPE]
    assert len(dicom) == len(files) + 1
    assert set(listed) == {i.sop_instance_uid for i, _ in dicom}
    where = {i.sop_instance_uid: p.resolve() for i, p in dicom}
    for uid, (_, path) in listed.items():  # each File ID leads to the received file itself
        assert path.is_symlink() and path.resolve() == where[uid]
        assert path.relative_to(folder).parts[0] == "DIRLINKS"
        assert all(len(c) <= 8 and c.isupper() for c in path.relative_to(folder).parts)
    sr = pydicom.dcmread(get_testdata_file("test-SR.dcm"), stop_before_pixels=True)
    assert listed[sr.SOPInstanceUID][0] == "SR DOCUMENT"
    assert {t for u, (t, _) in listed.items() if u != sr.SOPInstanceUID} == {"IMAGE"}
    # patient, study and series records above the instances
    tree = pydicom.dcmread(folder / "DICOMDIR")
    types = [r.DirectoryRecordType for r in tree.DirectoryRecordSequence]
    assert types.count("SERIES") == 3 and "PATIENT" in types and "STUDY" in types
    if shutil.which("dcmdump"):
        dump = subprocess.run(
            ["dcmdump", str(folder / "DICOMDIR")],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=60,
        )
        assert dump.returncode == 0, dump.stderr
        assert "=MediaStorageDirectoryStorage" in dump.stdout
        assert "(0004,1500) CS [DIRLINKS\\PT000001\\ST000001\\SE000001\\IM000001]" in dump.stdout
        assert dump.stdout.count("(0004,1430) CS [IMAGE") == len(files)


def test_odd_items_never_stop_the_index(tmp_path: Path) -> None:
    folder = tmp_path / "package"
    items: list[tuple[Item, Path]] = []
    names = ("CT_small.dcm", "rtplan.dcm", "rtdose.dcm", "test-SR.dcm")
    for number, name in enumerate(names, start=1):
        ds = pydicom.dcmread(get_testdata_file(name), stop_before_pixels=False)
        item = Item(
            id=number,
            name=name,
            media_type=DICOM_MEDIA_TYPE,
            size=0,
            sha256="",
            study_uid=ds.StudyInstanceUID,
            series_uid=ds.SeriesInstanceUID,
            sop_instance_uid=ds.SOPInstanceUID,
            sop_class_uid=ds.SOPClassUID,
        )
        path = folder / item_relative_path(item)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(get_testdata_file(name), path)
        items.append((item, path))
    broken = Item(id=9, name="cut.dcm", media_type=DICOM_MEDIA_TYPE, size=0, sha256="")
    cut = folder / item_relative_path(broken)
    cut.parent.mkdir(parents=True, exist_ok=True)
    cut.write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes()[:200])
    items.append((broken, cut))
    report = Item(id=10, name="r.pdf", media_type="application/pdf", size=0, sha256="")
    items.append((report, folder / item_relative_path(report)))

    result = write_received_dicomdir(folder, items)
    assert result.indexed == 4 and result.left_out == 1
    listed = _referenced(folder)
    types = sorted(t for t, _ in listed.values())
    assert types == ["IMAGE", "RT DOSE", "RT PLAN", "SR DOCUMENT"]
    assert all(p.resolve().is_file() for _, p in listed.values())


def test_sending_a_received_folder_again_skips_the_index(tmp_path: Path) -> None:
    from emix_core.client.sender import iter_files

    folder = tmp_path / "package"
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    item = Item(
        id=1, name="ct.dcm", media_type=DICOM_MEDIA_TYPE, size=0, sha256="",
        study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
        sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
    )  # fmt: skip
    path = folder / item_relative_path(item)
    path.parent.mkdir(parents=True)
    shutil.copy(get_testdata_file("CT_small.dcm"), path)
    assert write_received_dicomdir(folder, [(item, path)]).indexed == 1
    skipped: list[Path] = []
    assert list(iter_files([folder], skipped)) == [path]  # links and DICOMDIR are not sent
    assert [p.name for p in skipped] == ["DICOMDIR"]


def test_nothing_to_index_writes_no_dicomdir(tmp_path: Path) -> None:
    report = Item(id=1, name="r.pdf", media_type="application/pdf", size=0, sha256="")
    result = write_received_dicomdir(tmp_path, [(report, tmp_path / "documents" / "r.pdf")])
    assert result.path is None and not (tmp_path / "DICOMDIR").exists()


@pytest.mark.parametrize(
    ("sop_class", "record_type"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", "IMAGE"),
        ("1.2.840.10008.5.1.4.1.1.88.22", "SR DOCUMENT"),
        ("1.2.840.10008.5.1.4.1.1.88.59", "KEY OBJECT DOC"),
        ("1.2.840.10008.5.1.4.1.1.104.1", "ENCAP DOC"),
        ("1.2.840.10008.5.1.4.1.1.11.1", "PRESENTATION"),
    ],
)
def test_record_types_follow_the_sop_class(sop_class: str, record_type: str) -> None:
    assert record_type_of(sop_class) == record_type


def test_a_failing_index_leaves_the_reception_complete(
    hub_server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import emix_core.content.dicomdir as dicomdir

    def broken(*args: object, **kwargs: object) -> bytes:
        raise MemoryError("no room for the index")

    monkeypatch.setattr(dicomdir, "_dicomdir_bytes", broken)
    files = generate_study(tmp_path / "study", slices=3, series=1, rows=32, columns=32)
    mercy, mercy_client = hub_server.facility_home(tmp_path, "mercy")
    lakeside, lakeside_client = hub_server.facility_home(tmp_path, "lakeside")
    sent = send_paths([tmp_path / "study"], ["lakeside"], client=mercy_client, home=mercy)
    received = receive_package(
        sent.package_id, tmp_path / "in", client=lakeside_client, home=lakeside
    )
    assert len(received.items) == len(files) and all(p.is_file() for _, p in received.items)
    assert not (received.path / "DICOMDIR").exists()
    assert not (received.path / "DIRLINKS").exists()  # no half index left behind
