"""WADO-RS: instances, metadata, frames and bulk data (PS3.18 10.4).

Everything streams: instances one after the other, each decrypted as it is sent (and
decoded frame by frame when a transcoding is asked for); metadata one instance header at
a time; frames cut from the stored pixel data as it goes by.
"""

from __future__ import annotations

import json
import secrets
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from flask import Response, stream_with_context

from emix_core import DICOM_MEDIA_TYPE, InvalidInput, NotAcceptable, NotFoundError
from emix_dicomweb.origin.blueprint import route
from emix_dicomweb.origin.cache import metadata_cache
from emix_dicomweb.origin.negotiate import Choice, accepted, frame_choice, instance_syntax
from emix_dicomweb.origin.qido import DICOM_JSON
from emix_dicomweb.origin.scope import Located, Scope
from emix_dicomweb.origin.stored import PIXEL_DATA, StoredInstance
from emix_dicomweb.origin.transcode import decode_frame, instance_stream

__all__ = ["metadata_json", "multipart_response", "parse_frame_list"]

JSON_TYPES = frozenset({"", "*/*", "application/*", DICOM_JSON, "application/json"})
#: Binary values longer than this are given as a BulkDataURI in metadata.
BULK_THRESHOLD = 1024
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
MAX_FRAMES_PER_REQUEST = 10_000


def _boundary() -> str:
    return f"emix-{secrets.token_hex(16)}"


def multipart_response(
    parts: Iterable[tuple[str, Iterable[bytes], int | None]], part_type: str
) -> Response:
    """A streamed ``multipart/related`` answer; ``parts`` yields (type, body, length)."""
    boundary = _boundary()

    def generate() -> Iterator[bytes]:
        for content_type, body, length in parts:
            head = f"--{boundary}\r\nContent-Type: {content_type}\r\n"
            if length is not None:
                head += f"Content-Length: {length}\r\n"
            yield (head + "\r\n").encode("ascii")
            yield from body
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode("ascii")

    chunks = generate()
    first = [next(chunks)]  # opens the first part, so a failure is an error, not a cut answer
    first.append(next(chunks, b""))
    body = stream_with_context(_chain(first, chunks))
    return Response(
        body, content_type=f'multipart/related; type="{part_type}"; boundary={boundary}'
    )


def _chain(first: list[bytes], rest: Iterator[bytes]) -> Iterator[bytes]:
    yield from first
    yield from rest


# ------------------------------------------------------------------------------- instances


def _instance_parts(
    located: list[Located],
) -> Iterator[tuple[str, Iterable[bytes], int | None]]:
    for entry in located:
        stored = entry.item.transfer_syntax_uid or ""
        syntax = instance_syntax(stored)
        content_type = f"{DICOM_MEDIA_TYPE}; transfer-syntax={syntax}"
        if syntax == stored:
            yield content_type, entry.view.read_item(entry.item.id), entry.item.size
        else:
            yield (
                content_type,
                instance_stream(StoredInstance(entry.view.read_item(entry.item.id))),
                None,
            )


def _retrieve(scope: Scope, located: list[Located], what: str) -> Response:
    for entry in located:  # refuse before the first byte rather than halfway
        instance_syntax(entry.item.transfer_syntax_uid or "")
    response = multipart_response(_instance_parts(located), DICOM_MEDIA_TYPE)
    scope.audit(
        "instances-transferred", located, f"DICOMweb WADO-RS {what}: {len(located)} instances"
    )
    return response


@route("/studies/<study>")
def retrieve_study(study: str, package_id: str | None = None) -> Response:
    scope = Scope(package_id)
    return _retrieve(scope, scope.found(study), "study")


@route("/studies/<study>/series/<series>")
def retrieve_series(study: str, series: str, package_id: str | None = None) -> Response:
    scope = Scope(package_id)
    return _retrieve(scope, scope.found(study, series), "series")


@route("/studies/<study>/series/<series>/instances/<sop>")
def retrieve_instance(study: str, series: str, sop: str, package_id: str | None = None) -> Response:
    scope = Scope(package_id)
    return _retrieve(scope, scope.found(study, series, sop), "instance")


# -------------------------------------------------------------------------------- metadata


def metadata_json(stored: StoredInstance, url: str) -> dict[str, Any]:
    """One instance's attributes in the DICOM JSON model, with BulkDataURIs for the pixel
    data and every binary value larger than 1 KiB at the top level."""
    ds = stored.header
    bulky: dict[str, str] = {}
    for element in list(ds):
        if element.VR in BULK_VRS and element.value is not None:
            size = len(element.value) if isinstance(element.value, bytes | bytearray) else 0
            if size > BULK_THRESHOLD:
                bulky[f"{element.tag:08X}"] = element.VR
                del ds[element.tag]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = ds.to_json_dict(bulk_data_threshold=2**31, suppress_invalid_tags=True)
    for tag, vr in bulky.items():
        out[tag] = {"vr": vr, "BulkDataURI": f"{url}/bulk/{tag}"}
    if stored.pixel is not None:
        vr = "OB" if stored.pixel.encapsulated else stored.pixel.vr
        out[f"{PIXEL_DATA:08X}"] = {"vr": vr, "BulkDataURI": f"{url}/bulk/{PIXEL_DATA:08X}"}
    return dict(sorted(out.items()))


def _metadata(scope: Scope, located: list[Located], what: str) -> Response:
    if not any(a.media_type in JSON_TYPES for a in accepted()):
        raise NotAcceptable("metadata is sent as application/dicom+json only")

    def generate() -> Iterator[bytes]:
        yield b"["
        for index, entry in enumerate(located):
            url = scope.url(entry.study, entry.series, entry.sop)
            key = (entry.view.id, str(entry.item.id), url)
            data = metadata_cache.get(key)
            if data is None:
                stored = StoredInstance(entry.view.read_item(entry.item.id))
                stored.close()  # only the header is needed
                data = json.dumps(metadata_json(stored, url)).encode()
                metadata_cache.put(key, data)
            yield (b"," if index else b"") + data
        yield b"]"

    chunks = generate()
    first = [next(chunks), next(chunks)]  # the first header is read before the 200
    scope.audit(
        "instances-transferred",
        located,
        f"DICOMweb WADO-RS {what} metadata: {len(located)} instances",
    )
    return Response(stream_with_context(_chain(first, chunks)), mimetype=DICOM_JSON)


@route("/studies/<study>/metadata")
def study_metadata(study: str, package_id: str | None = None) -> Response:
    scope = Scope(package_id)
    return _metadata(scope, scope.found(study), "study")


@route("/studies/<study>/series/<series>/metadata")
def series_metadata(study: str, series: str, package_id: str | None = None) -> Response:
    scope = Scope(package_id)
    return _metadata(scope, scope.found(study, series), "series")


@route("/studies/<study>/series/<series>/instances/<sop>/metadata")
def instance_metadata(study: str, series: str, sop: str, package_id: str | None = None) -> Response:
    scope = Scope(package_id)
    return _metadata(scope, scope.found(study, series, sop), "instance")


# ---------------------------------------------------------------------------------- frames


def parse_frame_list(text: str) -> list[int]:
    """``1,3,5`` as 1-based frame numbers.

    :raises InvalidInput: not a comma-separated list of positive whole numbers.
    """
    try:
        numbers = [int(part) for part in text.split(",")]
    except ValueError:
        raise InvalidInput("a frame list is comma-separated frame numbers, from 1") from None
    if not numbers or min(numbers) < 1 or len(numbers) > MAX_FRAMES_PER_REQUEST:
        raise InvalidInput("a frame list is comma-separated frame numbers, from 1")
    return numbers


def open_instance(
    scope: Scope, study: str, series: str, sop: str
) -> tuple[Located, StoredInstance]:
    entry = scope.found(study, series, sop)[0]
    return entry, StoredInstance(entry.view.read_item(entry.item.id))


def frame_bytes(stored: StoredInstance, numbers: list[int], choice: Choice) -> Iterator[bytes]:
    """The bytes of the asked frames, in the order asked (frames read ahead are kept)."""
    count = stored.number_of_frames
    if not count or max(numbers) > count:
        raise NotFoundError("the instance has no such frame")
    left = Counter(numbers)
    pending: dict[int, bytes] = {}
    frames = stored.frames(n - 1 for n in numbers)
    for number in numbers:
        while number not in pending:
            index, data = next(frames)
            pending[index + 1] = decode_frame(stored, data).data if choice.decode else data
        yield pending[number]
        left[number] -= 1
        if not left[number]:
            del pending[number]
    stored.close()


def _frames_response(stored: StoredInstance, numbers: list[int], choice: Choice) -> Response:
    frames = frame_bytes(stored, numbers, choice)
    if not choice.multipart:
        if len(numbers) != 1:
            raise InvalidInput("several frames are sent as multipart/related only")
        data = next(frames)
        stored.close()
        return Response(data, content_type=choice.part_type)
    return multipart_response(((choice.part_type, [f], len(f)) for f in frames), choice.part_type)


@route("/studies/<study>/series/<series>/instances/<sop>/frames/<frame_list>")
def retrieve_frames(
    study: str, series: str, sop: str, frame_list: str, package_id: str | None = None
) -> Response:
    numbers = parse_frame_list(frame_list)
    scope = Scope(package_id)
    entry, stored = open_instance(scope, study, series, sop)
    choice = frame_choice(stored.transfer_syntax)
    response = _frames_response(stored, numbers, choice)
    scope.audit("instances-transferred", [entry], f"DICOMweb WADO-RS frames: {len(numbers)}")
    return response


@route("/studies/<study>/series/<series>/instances/<sop>/bulk/<tag>")
def retrieve_bulk(
    study: str, series: str, sop: str, tag: str, package_id: str | None = None
) -> Response:
    scope = Scope(package_id)
    entry, stored = open_instance(scope, study, series, sop)
    if tag.upper() == f"{PIXEL_DATA:08X}":
        if stored.pixel is None:
            raise NotFoundError("the instance has no pixel data")
        choice = frame_choice(stored.transfer_syntax)
        choice.multipart = True
        response = _frames_response(stored, list(range(1, stored.number_of_frames + 1)), choice)
    else:
        stored.close()
        try:
            element = stored.header.get(int(tag, 16))
        except ValueError:
            raise InvalidInput("a bulk data tag is 8 hexadecimal digits") from None
        if element is None or not isinstance(element.value, bytes | bytearray):
            raise NotFoundError("the instance has no such bulk data")
        value = bytes(element.value)
        response = multipart_response(
            [("application/octet-stream", [value], len(value))], "application/octet-stream"
        )
    scope.audit("instances-transferred", [entry], "DICOMweb WADO-RS bulk data")
    return response
