"""DICOM recognised by content, checked for truncation without reading pixel data."""

from __future__ import annotations

import random
import shutil
import tracemalloc
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.filereader import data_element_generator
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from emix_core.content.dicom import DicomInstance, inspect_instance, is_dicom, is_valid_uid
from emix_core.content.documents import classify
from emix_core.errors import InvalidInput, NotDicomError, TruncatedDicomError


def bundled(name: str) -> Path:
    """A test file shipped inside pydicom itself (no download)."""
    path = Path(get_testdata_file(name))
    assert "test_files" in path.parts, f"{name} is not bundled with pydicom"
    return path


def copy_as(name: str, target: Path) -> Path:
    shutil.copyfile(bundled(name), target)
    return target


def cut(name: str, target: Path, length: int) -> Path:
    target.write_bytes(bundled(name).read_bytes()[:length])
    return target


@pytest.mark.parametrize(
    ("name", "modality", "transfer_syntax"),
    [
        ("CT_small.dcm", "CT", ExplicitVRLittleEndian),
        ("MR_small.dcm", "MR", ExplicitVRLittleEndian),
        ("MR_small_implicit.dcm", "MR", ImplicitVRLittleEndian),
        ("MR_small_bigendian.dcm", "MR", ExplicitVRBigEndian),
        ("JPEG2000.dcm", "NM", JPEG2000),
        ("JPEG2000-embedded-sequence-delimiter.dcm", "NM", JPEG2000),
        ("MR_small_jp2klossless.dcm", "MR", JPEG2000Lossless),
        ("MR_small_RLE.dcm", "MR", RLELossless),
        ("SC_rgb_jpeg_dcmtk.dcm", "OT", JPEGBaseline8Bit),
        ("image_dfl.dcm", "OT", DeflatedExplicitVRLittleEndian),
        ("rtplan.dcm", "RTPLAN", ImplicitVRLittleEndian),
        ("reportsi.dcm", "SR", ExplicitVRLittleEndian),
    ],
)
def test_bundled_instances_are_classified_as_dicom_with_their_header(
    name: str, modality: str, transfer_syntax: str
) -> None:
    path = bundled(name)
    media_type, instance = classify(path)
    assert media_type == "application/dicom"
    assert isinstance(instance, DicomInstance)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert instance.study_uid == ds.StudyInstanceUID
    assert instance.series_uid == ds.SeriesInstanceUID
    assert instance.sop_instance_uid == ds.SOPInstanceUID
    assert instance.sop_class_uid == ds.SOPClassUID
    assert instance.transfer_syntax_uid == transfer_syntax
    assert instance.modality == modality
    assert instance.patient_name == str(ds.get("PatientName", ""))
    assert instance.size == path.stat().st_size


def test_ct_header_values_are_read() -> None:
    instance = inspect_instance(bundled("CT_small.dcm"))
    assert instance.patient_id == "1CT1"
    assert instance.patient_name == "CompressedSamples^CT1"
    assert instance.study_date == "20040119"
    assert instance.series_number == 1
    assert instance.instance_number == 1


@pytest.mark.parametrize(
    ("name", "transfer_syntax"),
    [
        ("ExplVR_LitEndNoMeta.dcm", ExplicitVRLittleEndian),
        ("ExplVR_BigEndNoMeta.dcm", ExplicitVRBigEndian),
    ],
)
def test_a_data_set_without_preamble_is_dicom_whatever_its_name(
    tmp_path: Path, name: str, transfer_syntax: str
) -> None:
    path = copy_as(name, tmp_path / "notes.txt")
    assert path.read_bytes()[128:132] != b"DICM"
    assert is_dicom(path)
    media_type, instance = classify(path)
    assert media_type == "application/dicom"
    assert instance is not None
    assert instance.transfer_syntax_uid == transfer_syntax
    assert instance.study_uid == "1.2.333.4444.5.6.7.8.9"


def test_an_implicit_vr_data_set_without_preamble_is_dicom(tmp_path: Path) -> None:
    ds = pydicom.dcmread(bundled("rtplan.dcm"))
    ds.preamble = None
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    path = tmp_path / "plan"
    ds.save_as(path, implicit_vr=True, little_endian=True)
    head = path.read_bytes()[:200]
    assert head[:2] == b"\x08\x00" and b"DICM" not in head and b"CS" not in head[:8]
    media_type, instance = classify(path)
    assert media_type == "application/dicom"
    assert instance is not None
    assert instance.transfer_syntax_uid == ImplicitVRLittleEndian
    assert instance.sop_instance_uid == ds.SOPInstanceUID


def test_a_dicom_file_named_report_pdf_is_dicom(tmp_path: Path) -> None:
    path = copy_as("CT_small.dcm", tmp_path / "report.pdf")
    assert classify(path)[0] == "application/dicom"


def test_a_pdf_named_dcm_is_a_pdf(tmp_path: Path) -> None:
    path = tmp_path / "IM0001.dcm"
    path.write_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\ntrailer\n%%EOF\n")
    assert not is_dicom(path)
    assert classify(path) == ("application/pdf", None)


def test_junk_named_dcm_is_refused_as_not_dicom(tmp_path: Path) -> None:
    path = tmp_path / "IM0001.dcm"
    path.write_bytes(random.Random(7).randbytes(40_000))
    with pytest.raises(NotDicomError) as error:
        classify(path)
    assert "IM0001.dcm" in error.value.message
    assert "not DICOM" in error.value.message
    with pytest.raises(NotDicomError):
        inspect_instance(path)


def test_random_bytes_text_and_pdfs_are_never_taken_for_dicom(tmp_path: Path) -> None:
    rng = random.Random(2024)
    path = tmp_path / "x.dcm"
    samples = [rng.randbytes(rng.randrange(8, 3000)) for _ in range(300)]
    # worst cases: junk starting like a group 0008 or 0002 element
    samples += [b"\x08\x00" + rng.randbytes(600) for _ in range(300)]
    samples += [b"\x02\x00\x00\x00UL" + rng.randbytes(600) for _ in range(100)]
    samples += [b"", b"DICM", b"%PDF-1.4\n", "Befund: unauffällig\n".encode() * 50]
    for sample in samples:
        path.write_bytes(sample)
        assert not is_dicom(path), sample[:16]


def test_a_dicomdir_is_not_an_instance() -> None:
    with pytest.raises(InvalidInput) as error:
        classify(bundled("DICOMDIR"))
    assert not isinstance(error.value, NotDicomError)
    assert "DICOMDIR index" in error.value.message
    assert "cd_import" in error.value.message


def test_ct_cut_inside_its_pixel_data_is_truncated(tmp_path: Path) -> None:
    size = bundled("CT_small.dcm").stat().st_size
    path = cut("CT_small.dcm", tmp_path / "ct.dcm", size - 5000)
    with pytest.raises(TruncatedDicomError) as error:
        classify(path)
    assert error.value.message.startswith("truncated DICOM file")
    assert "ct.dcm" not in error.value.message  # a file name can carry PHI
    assert "pixel data" in error.value.message
    assert "re-export the study from the modality/PACS" in error.value.message


@pytest.mark.parametrize("length", [141, 150, 301, 777, 1500, 2000, 2500, 3001, 3300])
def test_ct_cut_inside_its_header_is_truncated(tmp_path: Path, length: int) -> None:
    path = cut("CT_small.dcm", tmp_path / "ct.dcm", length)
    with pytest.raises(TruncatedDicomError) as error:
        inspect_instance(path)
    assert "DICOM header" in error.value.message


def test_ct_cut_right_before_its_pixel_data_is_truncated(tmp_path: Path) -> None:
    data = bundled("CT_small.dcm").read_bytes()
    pixel_element = data.rindex(b"\xe0\x7f\x10\x00OW")
    path = tmp_path / "ct.dcm"
    path.write_bytes(data[:pixel_element])
    with pytest.raises(TruncatedDicomError, match="before its pixel data"):
        inspect_instance(path)


def element_ends(path: Path) -> set[int]:
    """File offsets where a top-level element ends (cutting there leaves a shorter file
    that is structurally complete)."""
    with open(path, "rb") as fp:
        fp.seek(132)  # CT_small is explicit VR little endian throughout
        elements = data_element_generator(fp, is_implicit_VR=False, is_little_endian=True)
        return {raw.value_tell + raw.length for raw in elements}


def test_ct_cut_anywhere_inside_an_element_is_truncated(tmp_path: Path) -> None:
    source = bundled("CT_small.dcm")
    data = source.read_bytes()
    boundaries = element_ends(source)
    path = tmp_path / "ct.dcm"
    checked = 0
    for length in range(133, len(data), 31):
        if length in boundaries:
            continue
        path.write_bytes(data[:length])
        with pytest.raises(TruncatedDicomError):
            inspect_instance(path)
        checked += 1
    assert checked > 1000


@pytest.mark.parametrize("missing", [4, 8, 9, 200])
def test_jpeg2000_cut_inside_its_encapsulated_pixel_data_is_truncated(
    tmp_path: Path, missing: int
) -> None:
    size = bundled("JPEG2000.dcm").stat().st_size
    path = cut("JPEG2000.dcm", tmp_path / "nm.dcm", size - missing)
    with pytest.raises(TruncatedDicomError) as error:
        classify(path)
    assert "compressed pixel data" in error.value.message


def test_the_bundled_truncated_files_are_refused() -> None:
    for name in ("MR_truncated.dcm", "rtplan_truncated.dcm"):
        with pytest.raises(TruncatedDicomError):
            inspect_instance(bundled(name))


def test_a_deflated_data_set_cut_short_is_truncated(tmp_path: Path) -> None:
    size = bundled("image_dfl.dcm").stat().st_size
    path = cut("image_dfl.dcm", tmp_path / "dfl.dcm", size // 2)
    with pytest.raises(TruncatedDicomError):
        inspect_instance(path)


def test_a_value_length_past_the_end_of_the_file_is_truncated(tmp_path: Path) -> None:
    data = bytearray(bundled("CT_small.dcm").read_bytes())
    # Study Description (0008,1030) LO: claim a longer value than the file holds
    at = data.index(b"\x08\x00\x30\x10LO")
    data[at + 6 : at + 8] = (0xFFF0).to_bytes(2, "little")
    path = tmp_path / "ct.dcm"
    path.write_bytes(bytes(data[: at + 2000]))
    with pytest.raises(TruncatedDicomError):
        inspect_instance(path)


def with_header(tmp_path: Path, **values: str) -> Path:
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid values we want
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        path = tmp_path / "ct.dcm"
        ds.save_as(path)
    return path


HOSTILE_UIDS = [
    "../../etc",
    "1.2\x00.3",
    "1.2.3\x00/../x",
    "1." * 5000 + "1",
    "1.2.03",
    "1..2",
    "1.2.840.10008\\1.2.3",
    "/etc/passwd",
]


@pytest.mark.parametrize("uid", HOSTILE_UIDS)
@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_a_hostile_uid_is_refused_without_echoing_it(
    tmp_path: Path, keyword: str, uid: str
) -> None:
    path = with_header(tmp_path, **{keyword: uid})
    with pytest.raises(InvalidInput) as error:
        classify(path)
    assert error.value.message == (
        f"hostile or malformed UID in {keyword}; re-export the study from the modality/PACS"
    )


def test_a_uid_padded_with_one_trailing_nul_is_legal_and_accepted(tmp_path: Path) -> None:
    path = with_header(tmp_path, StudyInstanceUID="1.2.3\x00")
    _, instance = classify(path)
    assert instance is not None
    assert instance.study_uid == "1.2.3"


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_an_instance_without_its_uids_cannot_be_filed(tmp_path: Path, keyword: str) -> None:
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    delattr(ds, keyword)
    path = tmp_path / "ct.dcm"
    ds.save_as(path)
    with pytest.raises(InvalidInput, match=f"without {keyword}"):
        inspect_instance(path)


def test_sequences_nested_too_deeply_are_refused(tmp_path: Path) -> None:
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    inner = pydicom.Dataset()
    inner.CodeValue = "X"
    for _ in range(60):
        inner.is_undefined_length_sequence_item = True
        outer = pydicom.Dataset()
        outer.ConceptNameCodeSequence = [inner]
        outer["ConceptNameCodeSequence"].is_undefined_length = True
        inner = outer
    inner.is_undefined_length_sequence_item = True
    ds.ContentSequence = [inner]
    ds["ContentSequence"].is_undefined_length = True
    path = tmp_path / "deep.dcm"
    ds.save_as(path)
    with pytest.raises(InvalidInput, match="nested too deeply"):
        inspect_instance(path)


@pytest.mark.parametrize(
    ("uid", "valid"),
    [
        ("1.2.840.10008.1.2.1", True),
        ("0", True),
        ("1.0.2", True),
        ("2.25.329800735698586629295641978511506172918", True),
        ("1" * 64, True),
        ("1" * 65, False),
        ("", False),
        ("1.", False),
        (".1", False),
        ("1..2", False),
        ("01.2", False),
        ("1.02", False),
        ("1.2.a", False),
        ("1.2.3\n", False),
        ("1.2.3 ", False),
        ("1.2\x003", False),
        ("../../etc", False),
    ],
)
def test_is_valid_uid(uid: str, valid: bool) -> None:
    assert is_valid_uid(uid) is valid


def test_is_valid_uid_refuses_non_strings() -> None:
    assert not is_valid_uid(None)  # type: ignore[arg-type]
    assert not is_valid_uid(1.2)  # type: ignore[arg-type]


def test_inspecting_a_generated_slice_never_loads_its_pixel_data(tmp_path: Path) -> None:
    from emix_core.content.samples import generate_study

    (path,) = generate_study(tmp_path, slices=1, series=1, seed=1)
    pixel_bytes = 512 * 512 * 2
    inspect_instance(path)  # warm up imports and caches
    tracemalloc.start()
    try:
        instance = inspect_instance(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert instance.size > pixel_bytes
    assert peak < pixel_bytes / 4, f"inspecting allocated {peak} bytes"


def test_a_file_classified_before_and_unchanged_is_not_read_again(tmp_path: Path, monkeypatch):
    from emix_core.content import documents

    path = tmp_path / "ct.dcm"
    shutil.copyfile(get_testdata_file("CT_small.dcm"), path)
    first = classify(path)

    def no_second_read(_path: Path):  # type: ignore[no-untyped-def]
        raise AssertionError("read again")

    monkeypatch.setattr(documents, "inspect_instance", no_second_read)
    assert classify(path) == first
    # rewritten in place (same size, same modification time): read again
    data = path.read_bytes()
    stat = path.stat()
    path.write_bytes(data.replace(b"CompressedSamples^CT1", b"CompressedSamples^CT2"))
    import os

    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(AssertionError, match="read again"):
        classify(path)
