"""Reading the ``Accept`` header of a WADO-RS request (PS3.18 8.7).

For instances the answer is ``application/dicom`` parts, for frames and bulk data
``application/octet-stream`` (or a compressed image media type) parts. Without a
``transfer-syntax`` parameter the standard's default applies: Explicit VR Little Endian,
uncompressed. ``transfer-syntax=*`` means as stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from flask import request

from emix_core import DICOM_MEDIA_TYPE, NotAcceptable
from emix_dicomweb.multipart import media_type_parameters
from emix_dicomweb.origin.transcode import (
    EXPLICIT_LE,
    NATIVE,
    STORED,
    can_decode,
    frame_media_type,
)

__all__ = ["Choice", "accepted", "frame_choice", "instance_syntax"]

OCTET_STREAM = "application/octet-stream"
_SPLIT = re.compile(r',(?=(?:[^"]*"[^"]*")*[^"]*$)')


@dataclass
class Accepted:
    """One entry of the Accept header: the media type of the parts, whether multipart."""

    media_type: str
    multipart: bool
    transfer_syntax: str | None
    quality: float


def accepted(header: str | None = None) -> list[Accepted]:
    """The entries of the Accept header, best first (``*/*`` when there is none)."""
    text = request.headers.get("Accept", "") if header is None else header
    out: list[Accepted] = []
    for entry in _SPLIT.split(text):
        if not entry.strip():
            continue
        media_type, params = media_type_parameters(entry.strip())
        try:
            quality = float(params.get("q", "1"))
        except ValueError:
            quality = 1.0
        multipart = media_type.startswith("multipart/")
        part = params.get("type", "") if multipart else media_type
        if multipart and ";" in part:  # type="application/octet-stream; transfer-syntax=*"
            part, inner = media_type_parameters(part)
            params = {**inner, **params}
        out.append(Accepted(part.lower(), multipart, params.get("transfer-syntax"), quality))
    out.sort(key=lambda a: -a.quality)
    return out or [Accepted("*/*", True, None, 1.0)]


def instance_syntax(stored: str) -> str:
    """The transfer syntax to send an instance stored in ``stored`` in.

    :raises NotAcceptable: nothing the request accepts can be made from it.
    """
    for entry in accepted():
        if entry.media_type not in ("", "*/*", DICOM_MEDIA_TYPE, "application/*"):
            continue
        wanted = entry.transfer_syntax
        if wanted in (STORED, stored):
            return stored
        if wanted is None:  # the standard's default; as stored when it cannot be decoded
            return EXPLICIT_LE if can_decode(stored) else stored
        if wanted == EXPLICIT_LE and can_decode(stored):
            return EXPLICIT_LE
    raise NotAcceptable(
        "the instances cannot be sent in the transfer syntax asked for; the hub sends them "
        "as stored (transfer-syntax=*) or as Explicit VR Little Endian "
        f"({EXPLICIT_LE})"
    )


@dataclass
class Choice:
    """How frames are sent: decoded or as stored, in which part media type, multipart or not."""

    decode: bool
    media_type: str
    transfer_syntax: str
    multipart: bool

    @property
    def part_type(self) -> str:
        return f"{self.media_type}; transfer-syntax={self.transfer_syntax}"


def frame_choice(stored: str) -> Choice:
    """How to send the frames of an instance stored in ``stored``.

    :raises NotAcceptable: nothing the request accepts can be made from it.
    """
    native = stored in NATIVE
    for entry in accepted():
        wanted = entry.transfer_syntax
        if entry.media_type in ("", "*/*", OCTET_STREAM, "application/*"):
            if wanted in (STORED, stored) and not native:
                return Choice(False, OCTET_STREAM, stored, entry.multipart)
            if (
                wanted in (None, STORED, EXPLICIT_LE) or native and wanted == stored
            ) and can_decode(stored):
                return Choice(True, OCTET_STREAM, EXPLICIT_LE, entry.multipart)
        elif (
            entry.media_type == frame_media_type(stored)
            and not native
            and wanted in (None, STORED, stored)
        ):
            return Choice(False, entry.media_type, stored, entry.multipart)
    raise NotAcceptable(
        "the frames cannot be sent in the media type or transfer syntax asked for; ask for "
        'multipart/related; type="application/octet-stream" (uncompressed) or add '
        "transfer-syntax=* (as stored)"
    )
