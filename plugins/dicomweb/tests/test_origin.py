"""The hub as a DICOMweb origin server, checked with dicomweb-client and raw HTTP against
a real hub process: search, metadata, frames, transcoding, rendered images, WADO-URI."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image

from emix_core import LocalHome
from emix_core.testing import (
    BUNDLED,
    HubProcess,
    SampleStudy,
    Side,
    emix_json,
    make_hub,
    make_sample_study,
    side,
)

pytestmark = pytest.mark.e2e

ACCESSION = "ACC-ORIGIN-1"
PATIENT_ID = "PID-Origin-7"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_2000 = "1.2.840.10008.1.2.4.90"
RLE = "1.2.840.10008.1.2.5"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
MPEG2 = "1.2.840.10008.1.2.4.100"
VIEWER_ORIGIN = "https://viewer.example.org"


@dataclass
class Exchange:
    hub: HubProcess
    mercy: Side
    lakeside: Side
    study: SampleStudy
    package: str


@pytest.fixture(scope="module")
def exchange(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exchange]:
    """A hub where mercy sent one study (compressed, multi-frame, generated CT) to lakeside."""
    root = tmp_path_factory.mktemp("origin")
    study = make_sample_study(root / "study", accession=ACCESSION, patient_id=PATIENT_ID)
    for path in study.files:  # attributes a worklist searches on
        ds = pydicom.dcmread(path)
        ds.StudyTime = "101500"
        ds.StudyID = "S-77"
        ds.ReferringPhysicianName = "House^Gregory"
        ds.PatientBirthDate = "19700215"
        ds.PatientSex = "F"
        ds.PatientName = "Müller^Anna"
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.StudyDescription = "CT Chest"
        ds.save_as(path)
    hub = make_hub(root, f'cors_origins = ["{VIEWER_ORIGIN}"]')
    try:
        hub.add_facility("Mercy General", "admin@mercy.example.org", "mercy")
        hub.add_facility("Lakeside Imaging", "it@lakeside.example.org", "lakeside")
        mercy, lakeside = side(root, hub, "mercy"), side(root, hub, "lakeside")
        sent = emix_json("send", str(study.folder), "--to", "lakeside", env=mercy.env)
        assert sent["items"] == len(study.files), sent
        yield Exchange(hub, mercy, lakeside, study, sent["package"])
    finally:
        hub.stop()


@pytest.fixture
def hub(exchange: Exchange) -> HubProcess:
    return exchange.hub


@pytest.fixture
def mercy(exchange: Exchange) -> Side:
    return exchange.mercy


@pytest.fixture
def lakeside(exchange: Exchange) -> Side:
    return exchange.lakeside


@pytest.fixture
def study(exchange: Exchange) -> SampleStudy:
    return exchange.study


@pytest.fixture
def shared(exchange: Exchange) -> str:
    return exchange.package


def viewer(hub: HubProcess, who: Side, root: str = "/dicomweb") -> DICOMwebClient:
    return DICOMwebClient(f"{hub.url}{root}", headers={"Authorization": f"Bearer {who.token}"})


def get(hub: HubProcess, who: Side, path: str, accept: str | None = None, **params):
    headers = {"Authorization": f"Bearer {who.token}"}
    if accept:
        headers["Accept"] = accept
    return requests.get(f"{hub.url}{path}", headers=headers, params=params, timeout=60)


def by_syntax(study: SampleStudy, syntax: str) -> pydicom.Dataset:
    for path in study.files:
        ds = pydicom.dcmread(path)
        if ds.file_meta.TransferSyntaxUID == syntax:
            return ds
    raise AssertionError(syntax)


def test_root_search_finds_the_shared_study_with_the_required_attributes(
    hub, lakeside, mercy, shared, study
):
    client = viewer(hub, lakeside)
    studies = client.search_for_studies(search_filters={"PatientID": PATIENT_ID})
    assert len(studies) == 1
    found = studies[0]
    values = {k: v.get("Value", [None])[0] for k, v in found.items()}
    assert values["0020000D"] == study.study_uid
    assert values["00080030"] == "101500"  # StudyTime
    assert values["00200010"] == "S-77"  # StudyID
    assert values["00080090"] == {"Alphabetic": "House^Gregory"}
    assert values["00100030"] == "19700215" and values["00100040"] == "F"
    assert values["00100010"] == {"Alphabetic": "Müller^Anna"}
    assert values["00201208"] == len(study.files)
    assert values["00081190"] == f"{hub.url}/dicomweb/studies/{study.study_uid}"
    assert {"CT", "MR", "RTDOSE"} <= set(found["00080061"]["Value"])
    # the sender is no recipient: the root service shows it nothing, and 404s the study
    assert viewer(hub, mercy).search_for_studies() == []
    refused = get(hub, mercy, f"/dicomweb/studies/{study.study_uid}/series")
    assert refused.status_code == 404
    assert get(hub, mercy, f"/dicomweb/studies/{study.study_uid}/metadata").status_code == 404
    hub_events = LocalHome(hub.home).audit_log.events(package_id=shared, limit=None)
    assert {"query"} <= {e["event_type"] for e in hub_events}
    everything = LocalHome(hub.home).audit_log.events(limit=None, include_phi=True)
    empty = [e for e in everything if e["event_type"] == "query" and not e["package_id"]]
    assert empty and empty[-1]["actor"] == "admin@mercy.example.org"  # nothing found, audited
    assert study.study_uid not in json.dumps([e["detail"] for e in everything])


@pytest.mark.parametrize(
    ("filters", "hits"),
    [
        ({"PatientID": PATIENT_ID}, 1),
        ({"PatientID": PATIENT_ID.lower()}, 0),  # PatientID is case-sensitive
        ({"PatientName": "müller*"}, 1),  # person names are not
        ({"PatientName": "M?ller^Anna"}, 1),
        ({"PatientName": "Smith*"}, 0),
        ({"StudyDate": "19990101-"}, 1),
        ({"StudyDate": "-19990101"}, 0),
        ({"StudyTime": "1000-1100"}, 1),
        ({"StudyTime": "1100-"}, 0),
        ({"StudyID": "S-77"}, 1),
        ({"StudyID": "S-7"}, 0),
        ({"ReferringPhysicianName": "house*"}, 1),
        ({"AccessionNumber": "ACC-ORIGIN-*"}, 1),
        ({"AccessionNumber": "acc-origin-1"}, 0),
        ({"ModalitiesInStudy": "MR"}, 1),
        ({"ModalitiesInStudy": "US"}, 0),
        ({"00100020": PATIENT_ID}, 1),
    ],
)
def test_study_matching_follows_ps3_4(hub, lakeside, shared, filters, hits):
    assert len(viewer(hub, lakeside).search_for_studies(search_filters=filters)) == hits


def test_uid_lists_date_time_ranges_includefield_paging_and_warnings(hub, lakeside, shared, study):
    uids = f"1.2.3.4,{study.study_uid}"
    answer = get(hub, lakeside, "/dicomweb/studies", StudyInstanceUID=uids)
    assert len(answer.json()) == 1
    today = pydicom.dcmread(study.files[0]).StudyDate
    combined = get(hub, lakeside, "/dicomweb/studies", StudyDate=today, StudyTime="1015-1016")
    assert len(combined.json()) == 1
    later = get(hub, lakeside, "/dicomweb/studies", StudyDate=today, StudyTime="1016-")
    assert later.json() == []

    series = get(hub, lakeside, f"/dicomweb/studies/{study.study_uid}/series", limit=2)
    assert len(series.json()) == 2 and "additional results" in series.headers["Warning"]
    rest = get(hub, lakeside, f"/dicomweb/studies/{study.study_uid}/series", offset=2)
    assert len(rest.json()) == len({pydicom.dcmread(p).SeriesInstanceUID for p in study.files}) - 2
    fuzzy = get(hub, lakeside, "/dicomweb/studies", fuzzymatching="true")
    assert fuzzy.status_code == 200 and "fuzzymatching" in fuzzy.headers["Warning"]

    plain = get(hub, lakeside, "/dicomweb/studies").json()[0]
    assert "00081030" not in plain  # StudyDescription is not a required key
    included = get(hub, lakeside, "/dicomweb/studies", includefield="00081030,StudyDescription")
    assert included.json()[0]["00081030"]["Value"] == ["CT Chest"]
    everything = get(hub, lakeside, "/dicomweb/studies", includefield="all").json()[0]
    assert "00080062" in everything  # SOPClassesInStudy
    bad = get(hub, lakeside, "/dicomweb/studies", NoSuchAttribute="x")
    assert bad.status_code == 400
    assert get(hub, lakeside, "/dicomweb/studies", limit="many").status_code == 400

    instances = viewer(hub, lakeside).search_for_instances(
        study.study_uid, search_filters={"Modality": "CT"}
    )
    assert instances and all(i["00200013"]["Value"][0] >= 1 for i in instances)  # InstanceNumber
    assert {i["00280010"]["Value"][0] for i in instances} == {128}  # Rows
    root_series = get(hub, lakeside, "/dicomweb/series", Modality="RTDOSE").json()
    assert len(root_series) == 1 and root_series[0]["00100020"]["Value"] == [PATIENT_ID]
    root_instances = get(hub, lakeside, "/dicomweb/instances", PatientID=PATIENT_ID).json()
    assert len(root_instances) == len(study.files)


def test_series_metadata_has_bulk_data_uris_and_frames_decode(hub, lakeside, shared, study):
    client = viewer(hub, lakeside)
    ct = [p for p in study.files if pydicom.dcmread(p).Modality == "CT"]
    first = pydicom.dcmread(ct[0])
    metadata = client.retrieve_series_metadata(study.study_uid, first.SeriesInstanceUID)
    assert len(metadata) == len(ct)
    numbers = [m["00200013"]["Value"][0] for m in metadata]
    assert numbers == sorted(numbers)  # in Instance Number order, as viewers stack them
    one = next(m for m in metadata if m["00080018"]["Value"] == [first.SOPInstanceUID])
    assert one["7FE00010"]["BulkDataURI"].endswith(
        f"/instances/{first.SOPInstanceUID}/bulk/7FE00010"
    )
    assert one["00280010"]["Value"] == [first.Rows]
    assert (
        pydicom.Dataset.from_json({k: v for k, v in one.items() if k != "7FE00010"}).PatientID
        == PATIENT_ID
    )

    frames = client.retrieve_instance_frames(
        study.study_uid, first.SeriesInstanceUID, first.SOPInstanceUID, frame_numbers=[1]
    )
    assert frames[0] == first.PixelData
    bulk = client.retrieve_bulkdata(one["7FE00010"]["BulkDataURI"])
    assert bulk[0] == first.PixelData
    xml = get(
        hub,
        lakeside,
        f"/dicomweb/studies/{study.study_uid}/series/{first.SeriesInstanceUID}/metadata",
        accept="multipart/related; type=application/dicom+xml",
    )
    assert xml.status_code == 406


@pytest.mark.parametrize("syntax", [JPEG_BASELINE, JPEG_2000, RLE, "1.2.840.10008.1.2.4.80"])
def test_compressed_instances_are_transcoded_pixel_for_pixel(hub, lakeside, shared, study, syntax):
    original = by_syntax(study, syntax)
    client = viewer(hub, lakeside)
    uids = (study.study_uid, original.SeriesInstanceUID, original.SOPInstanceUID)
    # by default (PS3.18): Explicit VR Little Endian
    default = client.retrieve_instance(*uids, media_types=(("application/dicom",),))
    assert default.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert np.array_equal(default.pixel_array, original.pixel_array)
    asked = client.retrieve_instance(*uids, media_types=(("application/dicom", EXPLICIT_LE),))
    assert np.array_equal(asked.pixel_array, original.pixel_array)
    stored = client.retrieve_instance(*uids, media_types=(("application/dicom", "*"),))
    assert stored.file_meta.TransferSyntaxUID == syntax and stored.PixelData == original.PixelData
    # frames: uncompressed by default, as stored with transfer-syntax=*
    frame = client.retrieve_instance_frames(*uids, frame_numbers=[1])[0]
    decoded = default.pixel_array if default.get("NumberOfFrames", 1) in (None, 1) else None
    if (
        decoded is not None
        and default.PhotometricInterpretation == original.PhotometricInterpretation
    ):
        assert frame == default.PixelData[: len(frame)]
    raw = get(
        hub,
        lakeside,
        f"/dicomweb/studies/{uids[0]}/series/{uids[1]}/instances/{uids[2]}/frames/1",
        accept='multipart/related; type="application/octet-stream"; transfer-syntax=*',
    )
    assert raw.status_code == 200
    assert f"transfer-syntax={syntax}" in raw.headers["Content-Type"]
    # a syntax the hub cannot make is refused, not faked
    refused = get(
        hub,
        lakeside,
        f"/dicomweb/studies/{uids[0]}/series/{uids[1]}/instances/{uids[2]}",
        accept='multipart/related; type="application/dicom"; transfer-syntax=' + MPEG2,
    )
    assert refused.status_code == 406


def test_multiframe_frames_in_any_order(hub, lakeside, shared, study):
    original = next(
        pydicom.dcmread(p)
        for p in study.files
        if "rtdose" in str(p) or pydicom.dcmread(p).Modality == "RTDOSE"
    )
    client = viewer(hub, lakeside)
    uids = (study.study_uid, original.SeriesInstanceUID, original.SOPInstanceUID)
    frames = client.retrieve_instance_frames(*uids, frame_numbers=[3, 1, 3])
    size = len(original.PixelData) // int(original.NumberOfFrames)
    expected = [original.PixelData[i * size : (i + 1) * size] for i in (2, 0, 2)]
    assert frames == expected
    base = f"/dicomweb/studies/{uids[0]}/series/{uids[1]}/instances/{uids[2]}"
    assert get(hub, lakeside, f"{base}/frames/99").status_code == 404
    assert get(hub, lakeside, f"{base}/frames/0").status_code == 400
    assert get(hub, lakeside, f"{base}/frames/1,x").status_code == 400


def test_rendered_and_thumbnail_images(hub, lakeside, shared, study):
    original = by_syntax(study, JPEG_2000)
    base = (
        f"/dicomweb/studies/{study.study_uid}/series/{original.SeriesInstanceUID}"
        f"/instances/{original.SOPInstanceUID}"
    )
    jpeg = get(hub, lakeside, f"{base}/rendered", accept="image/jpeg")
    assert jpeg.headers["Content-Type"] == "image/jpeg"
    image = Image.open(io.BytesIO(jpeg.content))
    assert image.size == (original.Columns, original.Rows)
    png = get(
        hub, lakeside, f"{base}/rendered", accept="image/png", window="500,1000", viewport="32,32"
    )
    small = Image.open(io.BytesIO(png.content))
    assert small.format == "PNG" and small.size == (32, 32)
    # the window changes the picture
    other = get(
        hub, lakeside, f"{base}/rendered", accept="image/png", window="0,10", viewport="32,32"
    )
    assert other.content != png.content
    thumb = get(hub, lakeside, f"{base}/thumbnail", accept="image/jpeg")
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 128
    series_thumb = get(
        hub,
        lakeside,
        f"/dicomweb/studies/{study.study_uid}/series/{original.SeriesInstanceUID}/thumbnail",
    )
    assert series_thumb.status_code == 200
    assert get(hub, lakeside, f"{base}/rendered", accept="image/tiff").status_code == 406
    assert get(hub, lakeside, f"{base}/rendered", viewport="0,10").status_code == 400

    uri = get(
        hub,
        lakeside,
        "/dicomweb/wado",
        requestType="WADO",
        studyUID=study.study_uid,
        seriesUID=original.SeriesInstanceUID,
        objectUID=original.SOPInstanceUID,
        contentType="application/dicom",
    )
    ds = pydicom.dcmread(io.BytesIO(uri.content))
    assert ds.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert np.array_equal(ds.pixel_array, original.pixel_array)
    jpeg_uri = get(
        hub,
        lakeside,
        "/dicomweb/wado",
        requestType="WADO",
        studyUID=study.study_uid,
        seriesUID=original.SeriesInstanceUID,
        objectUID=original.SOPInstanceUID,
    )
    assert jpeg_uri.headers["Content-Type"] == "image/jpeg"


def test_per_package_service_still_answers(hub, lakeside, shared, study):
    client = viewer(hub, lakeside, f"/api/v1/packages/{shared}/dicomweb")
    found = client.search_for_studies(search_filters={"AccessionNumber": ACCESSION})
    assert found[0]["00081190"]["Value"][0].endswith(
        f"/api/v1/packages/{shared}/dicomweb/studies/{study.study_uid}"
    )
    whole = client.retrieve_study(study.study_uid, media_types=(("application/dicom", "*"),))
    assert {d.SOPInstanceUID for d in whole} == set(study.pixel_data())
    assert len(BUNDLED) + 16 == len(whole)


def test_ohif_viewer_calls_to_open_a_study(hub, lakeside, shared, study):
    """The requests OHIF Viewer 3 makes (study list, series, metadata, frames), verbatim."""
    auth = {"Authorization": f"Bearer {lakeside.token}"}
    qido = {**auth, "Accept": "application/dicom+json"}
    root = f"{hub.url}/dicomweb"
    listing = requests.get(
        f"{root}/studies?limit=101&offset=0&fuzzymatching=false"
        "&includefield=00081030%2C00080060%2C00080090%2C00100030&PatientName=*ller*",
        headers=qido,
        timeout=30,
    )
    assert listing.status_code == 200 and "Warning" not in listing.headers
    row = listing.json()[0]
    for tag in ("0020000D", "00100010", "00100020", "00080020", "00080030", "00080050"):
        assert row[tag].get("Value"), tag
    assert row["00081030"]["Value"] == ["CT Chest"]  # from includefield
    assert row["00201208"]["Value"] == [len(study.files)]
    assert row["00080061"]["Value"]
    again = requests.get(
        f"{root}/studies?limit=101&offset=0&fuzzymatching=false"
        f"&includefield=00081030%2C00080060&StudyInstanceUID={study.study_uid}",
        headers=qido,
        timeout=30,
    ).json()
    assert [r["0020000D"]["Value"][0] for r in again] == [study.study_uid]
    prior = requests.get(
        f"{root}/studies?00100020={PATIENT_ID}&limit=101&offset=0&fuzzymatching=false",
        headers=qido,
        timeout=30,
    ).json()
    assert len(prior) == 1
    series = requests.get(
        f"{root}/studies/{study.study_uid}/series"
        "?includefield=00080021%2C00080031%2C0008103E%2C00200011",
        headers=qido,
        timeout=30,
    ).json()
    numbers = [entry["00200011"]["Value"][0] for entry in series]
    assert numbers == sorted(numbers)
    for entry in series:
        assert entry["0020000E"]["Value"] and entry["00080060"]["Value"]
        assert entry["00200011"]["Value"]  # SeriesNumber
    frame_accept = "multipart/related; type=application/octet-stream; transfer-syntax=*"
    for entry in series:
        uid = entry["0020000E"]["Value"][0]
        metadata = requests.get(
            f"{root}/studies/{study.study_uid}/series/{uid}/metadata", headers=qido, timeout=30
        )
        assert metadata.headers["Content-Type"].startswith("application/dicom+json")
        instances = metadata.json()
        assert len(instances) == entry["00201209"]["Value"][0]
        first = instances[0]
        for tag in ("00080016", "00080018", "00280010", "00280011", "00280100", "00280004"):
            assert first[tag].get("Value"), tag
        sop = first["00080018"]["Value"][0]
        frame = requests.get(
            f"{root}/studies/{study.study_uid}/series/{uid}/instances/{sop}/frames/1",
            headers={**auth, "Accept": frame_accept},
            timeout=30,
        )
        assert frame.status_code == 200
        content_type = frame.headers["Content-Type"]
        assert content_type.startswith("multipart/related")
        assert "transfer-syntax=" in content_type  # cornerstone needs it for compressed data
        original = next(d for d in map(pydicom.dcmread, study.files) if d.SOPInstanceUID == sop)
        syntax = original.file_meta.TransferSyntaxUID
        expected = syntax if syntax.is_compressed else EXPLICIT_LE
        assert f"transfer-syntax={expected}" in content_type
        assert f"transfer-syntax={expected}" in frame.content.split(b"\r\n\r\n")[0].decode()


def _image_parts(response: requests.Response) -> list[tuple[str, Image.Image]]:
    """The parts of a multipart answer, each opened as an image."""
    from emix_dicomweb.multipart import PartHeaders, boundary_of, iter_multipart

    parts: list[tuple[str, Image.Image]] = []
    content_type, body = "", b""
    for piece in iter_multipart([response.content], boundary_of(response.headers["Content-Type"])):
        if isinstance(piece, PartHeaders):
            content_type, body = piece.headers.get("content-type", ""), b""
        elif isinstance(piece, bytes):
            body += piece
        else:
            parts.append((content_type, Image.open(io.BytesIO(body))))
    return parts


def test_rendered_series_and_study_are_multipart_images(hub, lakeside, shared, study):
    in_series = [pydicom.dcmread(p) for p in study.files if p.parent.name != study.folder.name]
    series_uid = in_series[0].SeriesInstanceUID
    assert len(in_series) > 1 and {d.SeriesInstanceUID for d in in_series} == {series_uid}
    base = f"/dicomweb/studies/{study.study_uid}/series/{series_uid}"
    answer = get(hub, lakeside, f"{base}/rendered", accept='multipart/related; type="image/png"')
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith('multipart/related; type="image/png"')
    parts = _image_parts(answer)
    assert len(parts) == len(in_series)
    assert all(t == "image/png" and i.format == "PNG" for t, i in parts)
    assert {i.size for _, i in parts} == {(in_series[0].Columns, in_series[0].Rows)}
    # the slices differ: each part is its own instance, not one image repeated
    assert len({i.tobytes() for _, i in parts}) > 1
    small = get(hub, lakeside, f"{base}/rendered", viewport="32,32", window="40,400")
    assert small.headers["Content-Type"].startswith('multipart/related; type="image/jpeg"')
    assert {i.size for _, i in _image_parts(small)} == {(32, 32)}
    # the whole study: every instance with pixel data the hub can decode, nothing else
    whole = get(hub, lakeside, f"/dicomweb/studies/{study.study_uid}/rendered", accept="*/*")
    assert len(in_series) < len(_image_parts(whole)) <= len(study.files)
    # per package too
    packaged = get(
        hub, lakeside, f"/api/v1/packages/{shared}/dicomweb/studies/{study.study_uid}/rendered"
    )
    assert len(_image_parts(packaged)) == len(_image_parts(whole))
    # PS3.18 10.4.4: a study or series asked for in a single-part media type only is 406
    assert get(hub, lakeside, f"{base}/rendered", accept="image/jpeg").status_code == 406
    assert get(hub, lakeside, f"{base}/rendered", window="1,-5").status_code == 400
    unknown = f"/dicomweb/studies/{study.study_uid}/series/1.2.3.4/rendered"
    assert get(hub, lakeside, unknown).status_code == 404


def test_cors_only_for_allow_listed_origins(hub, lakeside, shared):
    preflight = requests.options(
        f"{hub.url}/dicomweb/studies",
        headers={
            "Origin": VIEWER_ORIGIN,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
        timeout=30,
    )
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == VIEWER_ORIGIN
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    answer = requests.get(
        f"{hub.url}/dicomweb/studies",
        headers={"Origin": VIEWER_ORIGIN, "Authorization": f"Bearer {lakeside.token}"},
        timeout=30,
    )
    assert answer.headers["Access-Control-Allow-Origin"] == VIEWER_ORIGIN
    assert "Warning" in answer.headers["Access-Control-Expose-Headers"]
    stranger = requests.get(
        f"{hub.url}/dicomweb/studies",
        headers={"Origin": "https://evil.example.com", "Authorization": f"Bearer {lakeside.token}"},
        timeout=30,
    )
    assert stranger.status_code == 200
    assert "Access-Control-Allow-Origin" not in stranger.headers
