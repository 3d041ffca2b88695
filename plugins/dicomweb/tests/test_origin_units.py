"""The origin server's parts in process: reading stored instances forward, transcoding,
PS3.4 matching, Accept negotiation. Fast; the real hub is exercised in test_origin.py."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from emix_dicomweb.origin.matching import parse_query
from emix_dicomweb.origin.negotiate import frame_choice, instance_syntax
from emix_dicomweb.origin.stored import StoredInstance, read_header
from emix_dicomweb.origin.transcode import EXPLICIT_LE, instance_stream
from emix_dicomweb.origin.wado import metadata_json, parse_frame_list
from flask import Flask
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames
from werkzeug.datastructures import MultiDict

from emix_core import InvalidInput, NotAcceptable
from emix_core.testing import BUNDLED

ODD_FILES = ["MR_small_bigendian.dcm", "image_dfl.dcm", "MR_small_implicit.dcm", "CT_small.dcm"]


def chunks_of(path: str | Path, size: int = 1000):
    data = Path(path).read_bytes()
    return (data[i : i + size] for i in range(0, len(data), size))


@pytest.mark.parametrize("name", [*BUNDLED, *ODD_FILES, "examples_ybr_color.dcm"])
def test_frames_read_forward_equal_pydicoms_frames(name: str):
    path = get_testdata_file(name)
    original = pydicom.dcmread(path)
    stored = StoredInstance(chunks_of(path))
    count = stored.number_of_frames
    assert stored.header.SOPInstanceUID == original.SOPInstanceUID
    assert "PixelData" not in stored.header
    frames = dict(stored.frames(range(count)))
    if original.file_meta.TransferSyntaxUID.is_compressed:
        expected = list(generate_frames(original.PixelData, number_of_frames=count))
    elif stored.transfer_syntax == "1.2.840.10008.1.2.1.99":
        expected = [pydicom.dcmread(path).PixelData]
    else:
        size = stored.frame_length
        expected = [original.PixelData[i * size : (i + 1) * size] for i in range(count)]
    assert [frames[i] for i in range(count)] == expected


@pytest.mark.parametrize("name", [*BUNDLED, *ODD_FILES, "examples_ybr_color.dcm"])
def test_transcoding_to_explicit_little_endian_keeps_every_pixel(name: str):
    path = get_testdata_file(name)
    out = b"".join(instance_stream(StoredInstance(chunks_of(path))))
    ds = pydicom.dcmread(io.BytesIO(out))
    original = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert ds.SOPInstanceUID == original.SOPInstanceUID
    assert np.array_equal(ds.pixel_array, original.pixel_array)


def test_a_data_set_without_preamble_and_nested_sequences_are_read():
    header, syntax, pixel = read_header(chunks_of(get_testdata_file("rtstruct.dcm"), 7))
    full = pydicom.dcmread(get_testdata_file("rtstruct.dcm"), force=True)
    assert (syntax, pixel) == ("1.2.840.10008.1.2", None)
    assert len(header.ROIContourSequence) == len(full.ROIContourSequence)


def test_a_truncated_instance_is_a_typed_error():
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    stored = StoredInstance(iter([data[:-7000]]))  # cut inside the pixel data
    with pytest.raises(InvalidInput):
        list(stored.frames([0]))
    with pytest.raises(InvalidInput):
        StoredInstance(iter([b"not dicom at all" * 20]))


def test_metadata_gives_bulk_data_uris_for_pixels_and_large_values():
    path = get_testdata_file("CT_small.dcm")
    stored = StoredInstance(chunks_of(path))
    stored.header.add_new(0x00091010, "OB", b"\1" * 4096)  # a large private binary value
    out = metadata_json(stored, "https://hub/dicomweb/studies/1/series/2/instances/3")
    assert out["7FE00010"] == {
        "vr": "OW",
        "BulkDataURI": "https://hub/dicomweb/studies/1/series/2/instances/3/bulk/7FE00010",
    }
    assert out["00091010"]["BulkDataURI"].endswith("/bulk/00091010")
    assert out["00100010"]["Value"] == [{"Alphabetic": "CompressedSamples^CT1"}]


def query(**params: str):
    return parse_query(MultiDict(params))


RECORD = {
    "PatientName": ["Müller^Anna"],
    "PatientID": ["PID-7"],
    "StudyDate": ["20240105"],
    "StudyTime": ["101500"],
    "ModalitiesInStudy": ["CT", "MR"],
    "StudyInstanceUID": ["1.2.3"],
    "NumberOfStudyRelatedInstances": [4],
    "AccessionNumber": ["A-1"],
}
LEVEL = set(RECORD)


@pytest.mark.parametrize(
    ("params", "matches"),
    [
        ({"PatientName": "müller^anna"}, True),
        ({"PatientName": "M*"}, True),
        ({"PatientName": "Mu*"}, False),
        ({"PatientID": "pid-7"}, False),
        ({"PatientID": "PID-?"}, True),
        ({"StudyDate": "20240101-20240131"}, True),
        ({"StudyDate": "-20240104"}, False),
        ({"StudyDate": "20240105"}, True),
        ({"StudyTime": "10-11"}, True),
        ({"StudyTime": "1016-"}, False),
        ({"StudyDate": "20240104-20240105", "StudyTime": "2300-1000"}, False),
        ({"StudyDate": "20240104-20240105", "StudyTime": "2300-1100"}, True),
        ({"ModalitiesInStudy": "MR"}, True),
        ({"ModalitiesInStudy": "US\\MR"}, True),
        ({"ModalitiesInStudy": "US"}, False),
        ({"StudyInstanceUID": "9.9,1.2.3"}, True),
        ({"StudyInstanceUID": "1.2.*"}, False),
        ({"NumberOfStudyRelatedInstances": "4"}, True),
        ({"AccessionNumber": ""}, True),
        ({"00080050": "A-1"}, True),
    ],
)
def test_matching_follows_ps3_4_c2_2_2(params, matches):
    assert query(**params).matches(RECORD, LEVEL) is matches


def test_query_parameters_are_checked():
    parsed = query(includefield="00081030,PatientAge", limit="5", offset="2", fuzzymatching="true")
    assert parsed.include == {"StudyDescription", "PatientAge"}
    assert (parsed.limit, parsed.offset, parsed.fuzzy) == (5, 2, True)
    assert parsed.page(list(range(10))) == ([2, 3, 4, 5, 6], 3)
    assert query(includefield="all").include_all
    for bad in ({"limit": "-1"}, {"offset": "x"}, {"NotAnAttribute": "1"}, {"ZZZZZZZZ": "1"}):
        with pytest.raises(InvalidInput):
            query(**bad)
    for malformed in ("2024-01-05x", "2024*"):  # no wildcards on dates (C.2.2.2.4)
        with pytest.raises(InvalidInput):
            query(StudyDate=malformed).matches(RECORD, LEVEL)
    assert parse_frame_list("3,1") == [3, 1]
    for bad in ("0", "1,,2", "a", "-1"):
        with pytest.raises(InvalidInput):
            parse_frame_list(bad)


def test_a_wildcard_built_to_backtrack_answers_at_once():
    """``*?*?…x`` made the regex engine backtrack for minutes (one request, one worker)."""
    import time

    started = time.monotonic()
    hostile = query(PatientName="*?" * 400 + "x", PatientID="*" * 900 + "y")
    assert not hostile.matches({**RECORD, "PatientName": ["DOE^JOHN" * 50]}, LEVEL)
    assert time.monotonic() - started < 1
    assert query(PatientName="mül*").matches(RECORD, LEVEL)  # wildcards still match
    assert query(PatientID="PID-?").matches(RECORD, LEVEL)
    with pytest.raises(InvalidInput):
        query(PatientName="*" * 5000)


@pytest.mark.parametrize(
    ("accept", "stored", "syntax"),
    [
        ("", "1.2.840.10008.1.2.5", EXPLICIT_LE),
        ('multipart/related; type="application/dicom"', "1.2.840.10008.1.2.4.90", EXPLICIT_LE),
        (
            'multipart/related; type="application/dicom"; transfer-syntax=*',
            "1.2.840.10008.1.2.5",
            "1.2.840.10008.1.2.5",
        ),
        ("*/*", "1.2.840.10008.1.2", EXPLICIT_LE),
        (
            'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50',
            "1.2.840.10008.1.2.4.50",
            "1.2.840.10008.1.2.4.50",
        ),
    ],
)
def test_instance_transfer_syntax_negotiation(accept, stored, syntax):
    with Flask(__name__).test_request_context(headers={"Accept": accept} if accept else {}):
        assert instance_syntax(stored) == syntax


def test_frames_negotiation_and_406():
    app = Flask(__name__)
    ohif = "multipart/related; type=application/octet-stream; transfer-syntax=*"
    with app.test_request_context(headers={"Accept": ohif}):
        choice = frame_choice("1.2.840.10008.1.2.4.50")
        assert (choice.decode, choice.transfer_syntax) == (False, "1.2.840.10008.1.2.4.50")
        assert frame_choice("1.2.840.10008.1.2").transfer_syntax == EXPLICIT_LE
    with app.test_request_context(headers={"Accept": 'multipart/related; type="image/jp2"'}):
        assert frame_choice("1.2.840.10008.1.2.4.90").media_type == "image/jp2"
        with pytest.raises(NotAcceptable):
            frame_choice("1.2.840.10008.1.2.4.50")
    with app.test_request_context(headers={"Accept": "application/octet-stream"}):
        choice = frame_choice("1.2.840.10008.1.2.5")
        assert choice.decode and not choice.multipart
    mpeg = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.100'
    with app.test_request_context(headers={"Accept": mpeg}), pytest.raises(NotAcceptable):
        instance_syntax("1.2.840.10008.1.2.4.50")


class OlderPackage:
    """A package whose manifest predates the recorded search attributes."""

    id = "0" * 32

    def __init__(self, path: str) -> None:
        self.path = path

    def read_item(self, item_id: int):
        return chunks_of(self.path)


class OneStudyScope:
    def study_summary(self, study: str) -> dict:
        return {"study_uid": study, "series": 1, "instances": 1}  # no series_details

    def series_summary(self, study: str, series: str) -> None:
        return None

    def url(self, study: str, series: str | None = None, sop: str | None = None) -> str:
        return "https://hub/dicomweb/studies/" + "/".join(x for x in (study, series, sop) if x)


def test_packages_from_an_older_sender_are_answered_from_the_stored_headers():
    from emix_dicomweb.origin.qido import instance_record, series_record
    from emix_dicomweb.origin.scope import Located

    from emix_core import Item

    path = get_testdata_file("MR_small_RLE.dcm")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    item = Item(
        id=1,
        name="x.dcm",
        media_type="application/dicom",
        size=1,
        sha256="",
        study_uid=ds.StudyInstanceUID,
        series_uid=ds.SeriesInstanceUID,
        sop_instance_uid=ds.SOPInstanceUID,
        sop_class_uid=ds.SOPClassUID,
    )
    entry = Located(OlderPackage(path), item)  # type: ignore[arg-type]
    scope = OneStudyScope()
    series = series_record(scope, item.study_uid, item.series_uid, [entry])  # type: ignore[arg-type]
    assert series["Modality"] == ["MR"] and series["SeriesNumber"] == [ds.SeriesNumber]
    instance = instance_record(scope, entry)  # type: ignore[arg-type]
    assert instance["Rows"] == [64] and instance["NumberOfFrames"] == [1]
    assert instance["InstanceNumber"] == [int(ds.InstanceNumber)]


@pytest.mark.parametrize("window", ["nan,10", "40,inf", "40,0", "40", "40,400,cubic", "a,b"])
def test_a_hostile_window_is_refused(window: str):
    from emix_dicomweb.origin.rendered import _window

    context = Flask(__name__).test_request_context(query_string={"window": window})
    with context, pytest.raises(InvalidInput):
        _window()


def test_metadata_cache_is_bounded_in_size_and_time(monkeypatch):
    from emix_dicomweb.origin import cache

    kept = cache.MetadataCache(max_bytes=1600, ttl=60)
    for n in range(20):
        kept.put(("p", str(n)), b"x" * 100)
    assert len(kept) == 16 and kept.get(("p", "0")) is None  # the oldest went first
    assert kept.get(("p", "19")) == b"x" * 100
    kept.put(("p", "big"), b"x" * 1000)  # larger than a sixteenth: not kept
    assert kept.get(("p", "big")) is None
    now = cache.time.monotonic()
    monkeypatch.setattr(cache.time, "monotonic", lambda: now + 61)
    assert kept.get(("p", "19")) is None  # expired


def _reference_grey(values, center, width, function, invert):  # type: ignore[no-untyped-def]
    """The windowing of PS3.3 C.11.2.1.2, on the whole frame in float64."""
    import numpy as np

    if function == "sigmoid":
        out = 255 / (1 + np.exp(-4 * (values - center) / width))
    elif function == "linear-exact":
        out = (values - (center - width / 2)) / width * 255
    else:
        out = ((values - (center - 0.5)) / max(width - 1, 1) + 0.5) * 255
    out = np.clip(out, 0, 255)
    if invert:
        out = 255 - out
    return np.round(out).astype(np.uint8)


@pytest.mark.parametrize("function", ["linear", "linear-exact", "sigmoid"])
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_windowing_block_by_block_gives_the_whole_frame_result(function, photometric):
    import numpy as np
    from emix_dicomweb.origin.rendered import _grey
    from flask import Flask
    from pydicom.dataset import Dataset

    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 4096, size=(700, 300), dtype=np.uint16)
    ds = Dataset()
    ds.RescaleSlope, ds.RescaleIntercept = 1.5, -1024
    ds.PhotometricInterpretation = photometric
    query = {"window": f"40,400,{function}"}
    with Flask(__name__).test_request_context(query_string=query):
        got = _grey(pixels, ds)
    values = pixels.astype(np.float64) * 1.5 - 1024
    expected = _reference_grey(values, 40.0, 400.0, function, photometric == "MONOCHROME1")
    assert got.dtype == np.uint8 and got.shape == pixels.shape
    assert np.array_equal(got, expected)
    assert 0 < int((got == 0).sum()) < got.size  # the window really cuts


def test_a_large_frame_is_windowed_without_float_copies_of_the_whole_frame():
    """A 4096x4096 16-bit frame (32 MiB) once needed ~1 GiB of float64 temporaries."""
    import tracemalloc

    import numpy as np
    from emix_dicomweb.origin.rendered import _grey
    from flask import Flask
    from pydicom.dataset import Dataset

    pixels = np.arange(4096 * 4096, dtype=np.uint32).astype(np.uint16).reshape(4096, 4096)
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"  # no VOI: the frame's minimum and maximum
    with Flask(__name__).test_request_context():
        tracemalloc.start()
        try:
            grey = _grey(pixels, ds)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert grey.shape == (4096, 4096) and grey.min() == 0 and grey.max() == 255
    assert peak < 40 * 2**20, f"windowing peaked at {peak / 2**20:.0f} MiB"
