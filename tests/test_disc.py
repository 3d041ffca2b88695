"""The IHE PDI writer: a package's items as a disc folder or an ISO image."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import pycdlib
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.fileset import FileSet

from emix_core import (
    IntegrityError,
    InvalidInput,
    Item,
    generate_study,
    write_pdi_folder,
    write_pdi_iso,
    write_sample_report_txt,
)

DICOM = "application/dicom"


class Opener:
    """Opens a file, counting how many of its streams are open at once."""

    open_now = 0
    most = 0

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self):  # noqa: ANN204
        class Counted(io.FileIO):
            def close(self) -> None:
                if not self.closed:
                    Opener.open_now -= 1
                super().close()

        Opener.open_now += 1
        Opener.most = max(Opener.most, Opener.open_now)
        return io.BufferedReader(Counted(self.path, "r"))


def entries_for(paths: list[Path], media_type: str = DICOM, start: int = 1):  # noqa: ANN201
    return [
        (
            Item(
                id=start + n, name=p.name, media_type=media_type, size=p.stat().st_size, sha256=""
            ),
            Opener(p),
        )
        for n, p in enumerate(paths)
    ]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return generate_study(tmp_path_factory.mktemp("study"), slices=40, series=2, seed=7)


def test_folder_has_dicomdir_8_char_names_index_and_readme(study, tmp_path):
    report = tmp_path / "findings report.txt"
    write_sample_report_txt(
        report,
        facility="Mercy General",
        accession_number="A0001",
        patient_name="DEMO^PATIENT",
        findings="Normal.",
        impression="Normal study.",
    )
    extra = [Path(get_testdata_file("MR_small.dcm")), Path(get_testdata_file("test-SR.dcm"))]
    entries = entries_for(study + extra) + entries_for([report], "text/plain", start=100)
    disc = write_pdi_folder(entries, tmp_path / "disc")
    names = sorted(p.relative_to(disc).as_posix() for p in disc.rglob("*") if p.is_file())
    assert names[:3] == ["DICOM/PT000001/ST000001/SE000001/IM000001"] + [
        "DICOM/PT000001/ST000001/SE000001/IM000002",
        "DICOM/PT000001/ST000001/SE000001/IM000003",
    ]
    assert "DOCS/DOC00001.TXT" in names and {"DICOMDIR", "INDEX.HTM", "README.TXT"} <= set(names)
    fs = FileSet(disc / "DICOMDIR")
    assert len(fs) == 42
    # each instance's record follows its SOP class: a viewer lists the report as a report
    types = {i.SOPInstanceUID: i.node.record_type for i in fs}
    sr = pydicom.dcmread(get_testdata_file("test-SR.dcm"), stop_before_pixels=True)
    assert types.pop(sr.SOPInstanceUID) == "SR DOCUMENT"
    assert set(types.values()) == {"IMAGE"}
    assert len(fs.find(PatientID="4MR1")) == 1
    assert len(fs.find_values("StudyInstanceUID")) == 3  # the generated CT, MR_small, the SR
    original = {str(pydicom.dcmread(p).SOPInstanceUID): p.read_bytes() for p in study}
    for instance in fs.find(PatientID="DEMO-0001"):
        assert Path(instance.path).read_bytes() == original[instance.SOPInstanceUID]
    assert Opener.most == 1  # one item open at a time
    dump = subprocess.run(["dcmdump", "-q", str(disc / "DICOMDIR")], capture_output=True)
    assert dump.returncode == 0


def test_iso_is_plain_iso9660_level_1_and_streams_item_by_item(study, tmp_path):
    Opener.most = 0
    out = tmp_path / "disc.iso"
    with open(out, "wb") as sink:
        write_pdi_iso(entries_for(study), sink, volume_id="mercy 2026")
    assert Opener.most == 1
    iso = pycdlib.PyCdlib()
    iso.open(str(out))
    try:
        assert not iso.has_joliet() and not iso.has_rock_ridge()
        assert iso.pvd.volume_identifier.strip() == b"MERCY_2026"
        listing = list(iso.list_children(iso_path="/"))
        names = sorted(r.file_identifier().decode() for r in listing)
        assert names == [".", "..", "DICOM", "DICOMDIR.;1", "INDEX.HTM;1", "README.TXT;1"]
        data = io.BytesIO()
        iso.get_file_from_iso_fp(data, iso_path="/DICOM/PT000001/ST000001/SE000001/IM000001.;1")
        assert data.getvalue() in {p.read_bytes() for p in study}
    finally:
        iso.close()


def test_an_item_marked_dicom_that_is_not_is_refused(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    with pytest.raises(InvalidInput, match="cannot be read as DICOM"):
        write_pdi_folder(entries_for([bad]), tmp_path / "disc")


def test_an_item_shorter_than_its_manifest_is_refused(study, tmp_path):
    entries = entries_for(study[:2])
    entries[1][0].size += 10
    with pytest.raises(IntegrityError), open(tmp_path / "disc.iso", "wb") as sink:
        write_pdi_iso(entries, sink)


def test_a_folder_that_is_not_empty_is_not_written_into(study, tmp_path):
    (tmp_path / "disc").mkdir()
    (tmp_path / "disc" / "mine.txt").write_text("keep")
    with pytest.raises(InvalidInput, match="not empty"):
        write_pdi_folder(entries_for(study[:1]), tmp_path / "disc")
    assert os.listdir(tmp_path / "disc") == ["mine.txt"]
