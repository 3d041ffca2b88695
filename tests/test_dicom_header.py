"""inspect_instance reads the header values the structure walk kept (one read of the
file) and gives exactly what pydicom's reading gives, or lets pydicom decide."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files

from emix_core.content import dicom
from emix_core.content.header import decode_values
from emix_core.content.samples import generate_study


def read_both(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[object, object, bool]:
    """(result with the walk's values, result with pydicom only, whether the first was used)."""
    used: list[bool] = []

    def spy(*args):  # type: ignore[no-untyped-def]
        values = decode_values(*args)
        used.append(values is not None)
        return values

    def outcome() -> object:
        try:
            return dicom.inspect_instance(path)
        except Exception as exc:  # the same error either way
            return (type(exc).__name__, str(exc))

    with monkeypatch.context() as m:
        m.setattr(dicom, "decode_values", spy)
        fast = outcome()
    with monkeypatch.context() as m:
        m.setattr(dicom, "decode_values", lambda *args: None)
        slow = outcome()
    return fast, slow, any(used)


def test_every_bundled_test_file_reads_the_same_both_ways(monkeypatch):
    files = [Path(p) for p in get_testdata_files("*") if not p.endswith((".json", ".gz"))]
    assert len(files) > 50
    plain = 0
    for path in files:
        fast, slow, used = read_both(path, monkeypatch)
        assert fast == slow, path.name
        plain += used
    assert plain > 30  # most files take the one-read way


def test_a_generated_study_reads_the_same_both_ways(tmp_path, monkeypatch):
    generate_study(tmp_path / "study", slices=3, series=1, rows=64, columns=64)
    for path in sorted((tmp_path / "study").rglob("*.dcm")):
        fast, slow, used = read_both(path, monkeypatch)
        assert used and fast == slow
        assert isinstance(fast, dicom.DicomInstance) and fast.rows == 64


@pytest.mark.parametrize(
    "keyword, value",
    [
        ("PatientName", "Müller^Jürgen"),  # not ASCII: pydicom decodes the character set
        ("PatientID", "A\\B"),  # two values
        ("InstanceNumber", "7.0"),  # not an integer string
        ("SpecificCharacterSet", "ISO_IR 144"),  # Cyrillic
    ],
)
def test_values_outside_the_plain_case_are_left_to_pydicom(tmp_path, monkeypatch, keyword, value):
    path = tmp_path / "ct.dcm"
    shutil.copyfile(get_testdata_file("CT_small.dcm"), path)
    ds = pydicom.dcmread(path)
    if keyword == "PatientName":
        ds.SpecificCharacterSet = "ISO_IR 100"
    setattr(ds, keyword, value)
    ds.save_as(path)
    fast, slow, used = read_both(path, monkeypatch)
    assert not used and fast == slow


def test_the_plain_case_reads_each_value_like_pydicom(tmp_path, monkeypatch):
    path = tmp_path / "ct.dcm"
    shutil.copyfile(get_testdata_file("CT_small.dcm"), path)
    ds = pydicom.dcmread(path)
    ds.PatientName = "DOE^JANE^^DR "
    ds.AccessionNumber = " A-17 "
    ds.InstanceNumber = " +12"
    ds.SeriesNumber = None
    ds.save_as(path)
    fast, slow, used = read_both(path, monkeypatch)
    assert used and fast == slow
    assert isinstance(fast, dicom.DicomInstance)
    assert (fast.patient_name, fast.accession_number) == ("DOE^JANE^^DR", "A-17")
    assert (fast.instance_number, fast.series_number) == (12, None)
    differing = [
        f.name for f in dataclasses.fields(fast) if getattr(fast, f.name) != getattr(slow, f.name)
    ]
    assert differing == []
