"""Rendered resources and thumbnails (PS3.18 8.3.5, 10.4.1.1.3, 10.7): JPEG or PNG.

A rendered study or series is a ``multipart/related`` answer with one rendered image per
instance that has pixel data (its first frame), in the order a viewer shows them;
instances without pixel data (reports, documents) are left out. As PS3.18 10.4.4 says,
a request that accepts only single-part media types for a study or series gets 406.

One frame is decoded, rescaled (Rescale Slope/Intercept), windowed with ``window`` from
the request (``center,width[,linear|linear-exact|sigmoid]``) or else the instance's own
VOI (Window Center/Width), else its minimum and maximum, and fitted into ``viewport``
(``width,height``). MONOCHROME1 is inverted; colour images are sent in RGB.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import Response, request
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from emix_core import InvalidInput, NotAcceptable, NotFoundError
from emix_dicomweb.origin.blueprint import route
from emix_dicomweb.origin.negotiate import accepted
from emix_dicomweb.origin.scope import Located, Scope
from emix_dicomweb.origin.stored import StoredInstance
from emix_dicomweb.origin.transcode import can_decode, check_frame_size, decode_frame
from emix_dicomweb.origin.wado import multipart_response

__all__ = ["render", "rendered_set_media_type"]

FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG"}
THUMBNAIL_SIZE = 128
MAX_VIEWPORT = 4096


def _media_type() -> str:
    wanted = request.args.get("accept")
    entries = [wanted] if wanted else [a.media_type for a in accepted()]
    for media_type in entries:
        media_type = (media_type or "").split(";")[0].strip().lower()
        if media_type in FORMATS:
            return media_type
        if media_type in ("", "*/*", "image/*"):
            return "image/jpeg"
    raise NotAcceptable("rendered images are sent as image/jpeg or image/png")


def _viewport(default: int | None) -> tuple[int, int] | None:
    text = request.args.get("viewport")
    if not text:
        return (default, default) if default else None
    try:
        parts = [int(p) for p in text.split(",")[:2]]
    except ValueError:
        raise InvalidInput("viewport is width,height in pixels") from None
    if len(parts) != 2 or not all(0 < p <= MAX_VIEWPORT for p in parts):
        raise InvalidInput("viewport is width,height in pixels, each 1 to 4096")
    return parts[0], parts[1]


def _window() -> tuple[float, float, str] | None:
    args = request.args
    text = args.get("window")
    if not text and args.get("windowCenter") and args.get("windowWidth"):  # WADO-URI
        text = f"{args['windowCenter']},{args['windowWidth']}"
    if not text:
        return None
    parts = text.split(",")
    try:
        center, width = float(parts[0]), float(parts[1])
    except (ValueError, IndexError):
        raise InvalidInput("window is center,width[,function]") from None
    function = parts[2].strip().lower() if len(parts) > 2 else "linear"
    finite = math.isfinite(center) and math.isfinite(width)
    if not finite or width <= 0 or function not in ("linear", "linear-exact", "sigmoid"):
        raise InvalidInput(
            "window width must be positive; function linear, linear-exact or sigmoid"
        )
    return center, width, function


def _first(value: Any) -> float | None:
    """The first value of a possibly multi-valued number (Window Center may hold several)."""
    if value is None:
        return None
    try:
        return float(value[0] if isinstance(value, MultiValue | list | tuple) else value)
    except (TypeError, ValueError, IndexError):
        return None


def render(
    stored: StoredInstance, frame: int, media_type: str, viewport: tuple[int, int] | None
) -> bytes:
    """One frame as a JPEG or PNG image."""
    import numpy as np
    from PIL import Image
    from pydicom.pixels import convert_color_space

    ds = stored.header
    if stored.pixel is None:
        raise NotFoundError("the instance has no pixel data")
    if not 1 <= frame <= stored.number_of_frames:
        raise NotFoundError("the instance has no such frame")
    if not can_decode(stored.transfer_syntax):
        raise NotAcceptable("the hub cannot decode this instance's pixel data")
    check_frame_size(stored)  # before a byte is read: a small stored frame may claim GBs
    _, data = next(stored.frames([frame - 1]))
    stored.close()
    decoded = decode_frame(stored, data)
    rows, columns = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 8) or 8)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if bits not in (8, 16, 32):
        raise NotAcceptable("the hub renders 8, 16 and 32-bit pixel data only")
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits // 8}").newbyteorder("<")
    pixels = np.frombuffer(decoded.data, dtype=dtype)
    if samples == 1:
        image = Image.fromarray(_grey(pixels.reshape(rows, columns), ds), mode="L")
    else:
        if decoded.planar_configuration == 1:
            array = pixels.reshape(samples, rows, columns).transpose(1, 2, 0)
        else:
            array = pixels.reshape(rows, columns, samples)
        if decoded.photometric_interpretation.startswith("YBR"):
            array = convert_color_space(array, "YBR_FULL", "RGB")
        if bits > 8:
            array = _blockwise(array, _colour_to_8_bits(int(ds.get("BitsStored", bits) or bits)))
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)[:, :, :3], mode="RGB")
    if viewport:
        image.thumbnail(viewport)
    out = io.BytesIO()
    image.save(
        out, format=FORMATS[media_type], **({"quality": 90} if media_type == "image/jpeg" else {})
    )
    return out.getvalue()


#: Rows converted at a time: floating-point temporaries stay a few MiB whatever the frame.
BLOCK_ROWS = 256


def _blockwise(pixels: Any, convert: Callable[[Any], Any]) -> Any:
    """``convert`` (float64 → 0..255) applied a block of rows at a time into 8 bits.

    A 64 MiB frame converted whole would need several float64 copies of itself (GBs);
    block by block the peak is the decoded frame, its 8-bit image and one block.
    """
    import numpy as np

    out = np.empty(pixels.shape, dtype=np.uint8)
    for start in range(0, pixels.shape[0], BLOCK_ROWS):
        block = convert(pixels[start : start + BLOCK_ROWS].astype(np.float64))
        np.clip(block, 0, 255, out=block)
        out[start : start + BLOCK_ROWS] = np.round(block)
    return out


def _colour_to_8_bits(bits_stored: int) -> Callable[[Any], Any]:
    top = 2**bits_stored - 1

    def convert(block: Any) -> Any:
        block /= top
        block *= 255
        return block

    return convert


def _grey(pixels: Any, ds: Dataset) -> Any:
    """A monochrome frame rescaled (slope/intercept) and windowed to 8 bits (PS3.3 C.11.2)."""
    import numpy as np

    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    asked = _window()
    if asked is not None:
        center, width, function = asked
    else:
        voi_center = _first(ds.get("WindowCenter"))
        voi_width = _first(ds.get("WindowWidth"))
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").lower()
        if voi_center is None or voi_width is None or voi_width <= 0:
            ends = sorted(
                (float(pixels.min()) * slope + intercept, float(pixels.max()) * slope + intercept)
            )
            low, high = ends
            center, width, function = (low + high) / 2, max(high - low, 1.0), "linear-exact"
        else:
            center, width = voi_center, voi_width
    invert = str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1"

    def convert(block: Any) -> Any:
        block *= slope
        block += intercept
        if function == "sigmoid":
            block -= center
            block *= -4
            block /= width
            np.exp(block, out=block)
            block += 1
            np.divide(255, block, out=block)
        elif function == "linear-exact":
            block -= center - width / 2
            block /= width
            block *= 255
        else:  # PS3.3 C.11.2.1.2.1
            block -= center - 0.5
            block /= max(width - 1, 1)
            block += 0.5
            block *= 255
        if invert:
            np.clip(block, 0, 255, out=block)
            np.subtract(255, block, out=block)
        return block

    return _blockwise(pixels, convert)


def _answer(
    scope: Scope, entry: Located, frame: int, default_size: int | None, what: str
) -> Response:
    media_type = _media_type()
    viewport = _viewport(default_size)
    stored = StoredInstance(entry.view.read_item(entry.item.id))
    try:
        image = render(stored, frame, media_type, viewport)
    finally:
        stored.close()
    scope.audit("instances-transferred", [entry], f"DICOMweb WADO-RS {what}")
    return Response(image, content_type=media_type)


def _pick(scope: Scope, study: str, series: str | None, sop: str | None) -> Located:
    """The instance a study or series is shown by: the middle image of its first series."""
    located = scope.found(study, series, sop)
    if sop:
        return located[0]
    first_series = located[0].series
    members = sorted(
        (e for e in located if e.series == first_series),
        key=lambda e: (e.item.instance_number or 0, e.sop),
    )
    return members[len(members) // 2]


@route("/studies/<study>/series/<series>/instances/<sop>/rendered")
def rendered_instance(study: str, series: str, sop: str, package_id: str | None = None) -> Response:
    scope = Scope(package_id)
    return _answer(scope, _pick(scope, study, series, sop), 1, None, "rendered")


@route("/studies/<study>/series/<series>/instances/<sop>/frames/<int:frame>/rendered")
def rendered_frame(
    study: str, series: str, sop: str, frame: int, package_id: str | None = None
) -> Response:
    scope = Scope(package_id)
    return _answer(scope, _pick(scope, study, series, sop), frame, None, "rendered frame")


@route("/studies/<study>/thumbnail")
@route("/studies/<study>/series/<series>/thumbnail")
@route("/studies/<study>/series/<series>/instances/<sop>/thumbnail")
def thumbnail(
    study: str, series: str | None = None, sop: str | None = None, package_id: str | None = None
) -> Response:
    scope = Scope(package_id)
    return _answer(scope, _pick(scope, study, series, sop), 1, THUMBNAIL_SIZE, "thumbnail")


@route("/studies/<study>/series/<series>/instances/<sop>/frames/<int:frame>/thumbnail")
def frame_thumbnail(
    study: str, series: str, sop: str, frame: int, package_id: str | None = None
) -> Response:
    scope = Scope(package_id)
    return _answer(scope, _pick(scope, study, series, sop), frame, THUMBNAIL_SIZE, "thumbnail")


# --------------------------------------------------------------------------- study, series


def rendered_set_media_type() -> str:
    """The image type of the parts of a rendered study or series.

    :raises NotAcceptable: the request accepts only single-part or other media types.
    """
    wanted = request.args.get("accept")
    for entry in accepted(wanted) if wanted else accepted():
        media_type = entry.media_type.split(";")[0].strip().lower()
        if entry.multipart and media_type in FORMATS:
            return media_type
        if media_type in ("", "*/*") or entry.multipart and media_type == "image/*":
            return "image/jpeg"
    raise NotAcceptable(
        "a rendered study or series is sent as multipart/related; "
        'type="image/jpeg" or type="image/png"'
    )


def _rendered_parts(
    located: list[Located], media_type: str, viewport: tuple[int, int] | None
) -> Iterator[tuple[str, Iterable[bytes], int | None]]:
    for entry in located:
        stored = StoredInstance(entry.view.read_item(entry.item.id))
        try:
            if stored.pixel is None or not can_decode(stored.transfer_syntax):
                continue  # a report or a document: nothing to show
            try:
                image = render(stored, 1, media_type, viewport)
            except NotAcceptable:
                continue  # too large to render: left out like an undecodable one
        finally:
            stored.close()
        yield media_type, [image], len(image)


def _rendered_set(scope: Scope, located: list[Located], what: str) -> Response:
    media_type = rendered_set_media_type()
    viewport = _viewport(None)
    _window()  # a malformed window is refused before the first part
    parts = _rendered_parts(located, media_type, viewport)
    first = next(parts, None)
    if first is None:
        raise NotFoundError("nothing in it has pixel data the hub can render")
    scope.audit("instances-transferred", located, f"DICOMweb WADO-RS {what}")
    return multipart_response(_after(first, parts), media_type)


def _after(
    first: tuple[str, Iterable[bytes], int | None],
    rest: Iterator[tuple[str, Iterable[bytes], int | None]],
) -> Iterator[tuple[str, Iterable[bytes], int | None]]:
    yield first
    yield from rest


@route("/studies/<study>/rendered")
def rendered_study(study: str, package_id: str | None = None) -> Response:
    scope = Scope(package_id)
    return _rendered_set(scope, scope.found(study), "rendered study")


@route("/studies/<study>/series/<series>/rendered")
def rendered_series(study: str, series: str, package_id: str | None = None) -> Response:
    scope = Scope(package_id)
    return _rendered_set(scope, scope.found(study, series), "rendered series")
