"""Small greyscale PNG previews of DICOM images, for the package page (no viewer needed)."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import pydicom

from emix_core.errors import EmixError

SIZE = 160
#: Largest frame previewed, bytes once decoded: a few MB of RLE or JPEG can claim gigabytes.
MAX_FRAME_BYTES = 64 * 1024 * 1024


class NoPreview(EmixError):
    """The instance has no image the hub can preview (compressed, not an image, ...)."""

    http_status = 404
    code = "no_preview"


def png(pixels: Any) -> bytes:
    """Encode a 2-D uint8 array as a greyscale PNG."""
    height, width = pixels.shape
    raw = b"".join(b"\x00" + pixels[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def _window(ds: Any, frame: Any) -> Any:
    import numpy as np

    data = frame.astype(np.float32)
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    data = data * slope + intercept
    center = ds.get("WindowCenter")
    width = ds.get("WindowWidth")
    if center is not None and width is not None:
        center = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        low, high = center - width / 2, center + width / 2
    else:
        low, high = float(np.percentile(data, 1)), float(np.percentile(data, 99))
    scaled = np.clip((data - low) / max(high - low, 1e-6), 0, 1) * 255
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        scaled = 255 - scaled
    return scaled.astype(np.uint8)


def _frame_bytes(ds: Any) -> int:
    """Bytes of one frame once decoded, as the image attributes claim."""
    try:
        samples = int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0)
        samples *= int(ds.get("SamplesPerPixel", 1) or 1)
        return samples * max(int(ds.get("BitsAllocated", 8) or 8), 8) // 8
    except (TypeError, ValueError):
        return MAX_FRAME_BYTES + 1


def thumbnail(data: bytes, size: int = SIZE) -> bytes:
    """A PNG at most ``size`` pixels wide or high of the first frame of a DICOM instance."""
    try:
        import numpy as np
        from pydicom.pixels import pixel_array

        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        if _frame_bytes(ds) > MAX_FRAME_BYTES:
            raise NoPreview("no preview for this image: it is too large")
        pixels = pixel_array(io.BytesIO(data), index=0)  # the first frame only
    except NoPreview:
        raise
    except Exception as exc:  # compressed without a decoder, no pixel data, not DICOM
        raise NoPreview("no preview for this image") from exc
    if pixels.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
        pixels = pixels[0]
    # pick the preview's pixels first: only they are ever turned into floating point
    step = max(1, -(-max(pixels.shape[:2]) // size))
    pixels = pixels[::step, ::step]
    if pixels.ndim == 3:  # colour: luminance
        pixels = (pixels[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.float32)
        grey = np.clip(pixels, 0, 255).astype(np.uint8)
    else:
        grey = _window(ds, pixels)
    return png(np.ascontiguousarray(grey))
