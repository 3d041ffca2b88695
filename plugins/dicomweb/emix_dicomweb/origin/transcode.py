"""Transfer syntaxes: what a request may ask for, and decoding to Explicit VR Little Endian.

PS3.18 8.7.3: an instance asked for without a transfer syntax is sent in Explicit VR
Little Endian, uncompressed bulk data likewise; ``transfer-syntax=*`` means "as stored".
emix decodes JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000 and RLE with pydicom's
decoders (pylibjpeg plugins), one frame at a time, and answers 406 only for what no
installed decoder can make.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID

from emix_core import NotAcceptable
from emix_dicomweb.origin.stored import (
    DEFLATED_LE,
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    StoredInstance,
)

__all__ = [
    "EXPLICIT_LE",
    "NATIVE",
    "STORED",
    "can_decode",
    "decode_frame",
    "frame_media_type",
    "instance_stream",
]

#: "As stored": ``transfer-syntax=*``.
STORED = "*"
#: Largest frame the hub decodes or renders, bytes of native pixel data (a 4096 x 4096
#: 16-bit image is 32 MiB): a few MB of RLE or JPEG can claim gigabytes once decoded.
MAX_DECODED_FRAME = 64 * 1024 * 1024
NATIVE = frozenset({IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE, DEFLATED_LE})
#: Bulk data media types of compressed frames (PS3.18 Table 8.7.3-5).
FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}


def frame_media_type(syntax: str) -> str:
    """The media type of one stored frame: ``application/octet-stream`` when native."""
    return FRAME_MEDIA_TYPES.get(syntax, "application/octet-stream")


def can_decode(syntax: str) -> bool:
    """True when frames stored in ``syntax`` can be given out uncompressed."""
    if syntax in NATIVE:
        return True
    try:
        from pydicom.pixels import get_decoder

        return get_decoder(UID(syntax)).is_available
    except (NotImplementedError, ValueError):
        return False


@dataclass
class DecodedFrame:
    """One frame, native little endian, and how its pixels are to be read."""

    data: bytes
    photometric_interpretation: str
    planar_configuration: int | None


def check_frame_size(stored: StoredInstance) -> None:
    """Refuse to decode a frame larger than :data:`MAX_DECODED_FRAME` once native.

    :raises NotAcceptable: the instance's image attributes claim a larger frame.
    """
    ds = stored.header
    try:
        samples = int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0)
        samples *= int(ds.get("SamplesPerPixel", 1) or 1)
        size = samples * max(int(ds.get("BitsAllocated", 8) or 8), 8) // 8
    except (TypeError, ValueError):
        size = MAX_DECODED_FRAME + 1
    if size > MAX_DECODED_FRAME:
        raise NotAcceptable(
            "this instance's frames are too large for the hub to decode or render; "
            "ask for transfer-syntax=* to receive it as stored"
        )


def decode_frame(stored: StoredInstance, data: bytes) -> DecodedFrame:
    """The native (uncompressed, little endian) bytes of one stored frame.

    :raises NotAcceptable: no installed decoder for the stored transfer syntax.
    """
    header = stored.header
    syntax = stored.transfer_syntax
    check_frame_size(stored)
    interpretation = str(header.get("PhotometricInterpretation", "") or "")
    planar = header.get("PlanarConfiguration")
    if syntax in NATIVE:
        if syntax == EXPLICIT_BE:
            data = _swap(data, int(header.get("BitsAllocated", 8) or 8))
        return DecodedFrame(data, interpretation, planar)
    if not can_decode(syntax):
        raise NotAcceptable(
            "this instance is stored compressed in a transfer syntax the hub cannot decode; "
            "ask for transfer-syntax=* to receive it as stored"
        )
    from pydicom.pixels import get_decoder

    frame = Dataset()
    for keyword in (
        "Rows",
        "Columns",
        "SamplesPerPixel",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "PhotometricInterpretation",
        "PlanarConfiguration",
    ):
        if keyword in header:
            setattr(frame, keyword, header[keyword].value)
    frame.NumberOfFrames = 1
    frame.file_meta = FileMetaDataset()
    frame.file_meta.TransferSyntaxUID = UID(syntax)
    frame.PixelData = encapsulate([data])
    try:
        buffer, meta = get_decoder(UID(syntax)).as_buffer(frame, index=0)
    except Exception as exc:  # decoder errors carry no PHI but are not typed
        raise NotAcceptable(
            "the hub could not decode this compressed frame; ask for transfer-syntax=*"
        ) from exc
    interpretation = str(meta.get("photometric_interpretation", interpretation))
    if interpretation == "YBR_FULL_422":
        interpretation = "YBR_FULL"  # decoders give every sample, no longer subsampled
    return DecodedFrame(
        bytes(buffer),
        interpretation,
        meta.get("planar_configuration", planar),  # type: ignore[arg-type]
    )


def _swap(data: bytes, bits: int) -> bytes:
    import numpy as np

    if bits in (16, 32, 64):
        return np.frombuffer(data, dtype=f">u{bits // 8}").astype(f"<u{bits // 8}").tobytes()
    return data


def instance_stream(stored: StoredInstance) -> Iterator[bytes]:
    """The instance re-encoded in Explicit VR Little Endian, pixel data decoded frame by
    frame; the header is written by pydicom, the pixel data streamed after it."""
    header = stored.header
    count = stored.number_of_frames
    frames = stored.frames(range(count)) if count else iter(())
    first = next(frames, None)
    decoded = decode_frame(stored, first[1]) if first else None
    out = Dataset()
    out.update(header)
    out.file_meta = FileMetaDataset(getattr(header, "file_meta", FileMetaDataset()))
    out.file_meta.TransferSyntaxUID = UID(EXPLICIT_LE)
    if decoded is not None and stored.transfer_syntax not in NATIVE:
        out.PhotometricInterpretation = decoded.photometric_interpretation
        if int(header.get("SamplesPerPixel", 1) or 1) > 1:
            out.PlanarConfiguration = decoded.planar_configuration or 0
        if str(UID(stored.transfer_syntax).info).lower().find("lossy") >= 0 or (
            stored.transfer_syntax in ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51")
        ):
            out.LossyImageCompression = "01"
    if "ExtendedOffsetTable" in out:
        del out["ExtendedOffsetTable"]
    if "ExtendedOffsetTableLengths" in out:
        del out["ExtendedOffsetTableLengths"]
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # pydicom's warnings may quote values (PHI)
        warnings.simplefilter("ignore")
        pydicom.dcmwrite(buffer, out, enforce_file_format=True)
    yield buffer.getvalue()
    if decoded is None or first is None:
        return
    length = len(decoded.data) * count
    bits = int(header.get("BitsAllocated", 8) or 8)
    vr = b"OW" if bits > 8 else b"OB"
    yield struct.pack("<HH", 0x7FE0, 0x0010) + vr + b"\0\0" + struct.pack("<L", length + length % 2)
    yield decoded.data
    for _, data in frames:
        frame = decode_frame(stored, data).data
        if len(frame) != len(decoded.data):
            raise NotAcceptable("the frames of this instance differ in size; cannot transcode")
        yield frame
    if length % 2:
        yield b"\0"
