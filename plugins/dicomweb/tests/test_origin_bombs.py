"""A sending facility's crafted instance must not exhaust the recipient hub: a small RLE
frame that claims 20000 x 20000 pixels (400 MB decoded from 6 MB stored, 3 GB once
rendered) is refused with a clear 406, fast, and the hub keeps answering."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless, generate_uid

from emix_core.testing import HubProcess, Side, emix_json, make_hub, side

pytestmark = pytest.mark.e2e

SIDE = 20_000  # pixels each way: 400 MB of 8-bit samples once decoded


def _rle_zero_frame(rows: int, columns: int) -> bytes:
    """One RLE Lossless segment of an all-zero 8-bit frame (PS3.5 G.3): 2 bytes per 128."""
    run = bytes([0x81, 0])  # replicate the next byte 128 times
    rest = columns % 128
    line = run * (columns // 128) + (bytes([257 - rest, 0]) if rest else b"")
    return struct.pack("<16I", 1, 64, *([0] * 14)) + line * rows


def _bomb(folder: Path) -> tuple[str, str, str]:
    """A CT instance whose RLE pixel data decodes to SIDE x SIDE: its study, series, SOP."""
    folder.mkdir(parents=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = RLELossless
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "BOMB^PATIENT", "PID-BOMB", "CT"
    ds.Rows = ds.Columns = SIDE
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([_rle_zero_frame(SIDE, SIDE)])
    ds["PixelData"].VR = "OB"
    ds.save_as(folder / "bomb.dcm", enforce_file_format=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


@pytest.fixture(scope="module")
def bombed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubProcess, Side, tuple]]:
    root = tmp_path_factory.mktemp("bomb")
    uids = _bomb(root / "study")
    assert pydicom.dcmread(root / "study" / "bomb.dcm").Rows == SIDE
    hub = make_hub(root)
    try:
        hub.add_facility("Mercy General", "admin@mercy.example.org", "mercy")
        hub.add_facility("Lakeside Imaging", "it@lakeside.example.org", "lakeside")
        mercy, lakeside = side(root, hub, "mercy"), side(root, hub, "lakeside")
        emix_json("send", str(root / "study"), "--to", "lakeside", env=mercy.env)
        yield hub, lakeside, uids
    finally:
        hub.stop()


@pytest.mark.parametrize(
    ("path", "accept"),
    [
        ("/studies/{0}/series/{1}/instances/{2}/rendered", "image/png"),
        (
            "/studies/{0}/series/{1}/instances/{2}/frames/1",
            "multipart/related; type=application/octet-stream",
        ),
        ("/studies/{0}/rendered", 'multipart/related; type="image/jpeg"'),
    ],
)
def test_a_decompression_bomb_is_refused_fast_and_the_hub_keeps_answering(bombed, path, accept):
    hub, lakeside, uids = bombed
    started = time.monotonic()
    answer = requests.get(
        f"{hub.url}/dicomweb{path.format(*uids)}",
        headers={"Authorization": f"Bearer {lakeside.token}", "Accept": accept},
        timeout=60,
    )
    assert time.monotonic() - started < 10
    assert answer.status_code in (404, 406), answer.text[:300]
    assert "BOMB" not in answer.text and uids[0] not in answer.text
    assert requests.get(f"{hub.url}/healthz", timeout=10).status_code == 200
