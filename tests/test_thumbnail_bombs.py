"""A crafted instance from a sending facility must not exhaust the hub through a preview:
a small RLE frame claiming 10000 x 10000 pixels (100 MB decoded, 400 MB as floats) gets
no preview, at once, without being decoded."""

from __future__ import annotations

import io
import struct
import time

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless, generate_uid

from emix_core.hub.thumbnails import NoPreview, thumbnail


def _rle_bomb(side: int, frames: int = 1) -> bytes:
    run = bytes([0x81, 0])  # RLE: replicate the next byte 128 times
    rest = side % 128
    line = run * (side // 128) + (bytes([257 - rest, 0]) if rest else b"")
    frame = struct.pack("<16I", 1, 64, *([0] * 14)) + line * side
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = RLELossless
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = encapsulate([frame] * frames)
    ds["PixelData"].VR = "OB"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_a_decompression_bomb_gets_no_preview_without_being_decoded():
    data = _rle_bomb(10_000)
    assert len(data) < 4 * 1024 * 1024
    started = time.monotonic()
    with pytest.raises(NoPreview, match="too large"):
        thumbnail(data)
    assert time.monotonic() - started < 1.0


def test_a_multiframe_instance_is_previewed_from_its_first_frame_only():
    data = _rle_bomb(1_024, frames=300)  # 300 MB of frames once decoded, 5 MB stored
    started = time.monotonic()
    assert thumbnail(data).startswith(b"\x89PNG")
    assert time.monotonic() - started < 1.5


def test_an_ordinary_rle_image_still_gets_its_preview():
    assert thumbnail(_rle_bomb(512)).startswith(b"\x89PNG")


def test_a_large_allowed_frame_is_previewed_without_float_copies_of_the_whole_frame():
    """Just under the limit (7000 x 7000 8-bit, 47 MiB decoded): only the preview's own
    pixels become floating point, not the whole frame (which needed ~400 MiB)."""
    import tracemalloc

    data = _rle_bomb(7_000)
    tracemalloc.start()
    try:
        image = thumbnail(data, size=128)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert image.startswith(b"\x89PNG")
    width, height = struct.unpack(">II", image[16:24])
    assert max(width, height) <= 128
    assert peak < 47 * 2**20 + 64 * 2**20, f"the preview peaked at {peak / 2**20:.0f} MiB"
