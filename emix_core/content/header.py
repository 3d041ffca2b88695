"""The header attributes emix needs, decoded from the bytes the structure walk kept.

Walking a file's elements already reads every top-level element header; the walk keeps
the short values of :data:`WANTED` on the way. This module turns them into the values
pydicom would give, for the plain case only: a default, Latin-1 or UTF-8 character set,
printable ASCII values, one value per attribute, numbers that are numbers. Anything else
(another character set, a multi-valued or odd value, an unexpected VR) answers ``None``
and pydicom reads the header instead, so both ways agree on every file.
"""

from __future__ import annotations

import re
import struct

from pydicom.datadict import dictionary_VR, keyword_for_tag

__all__ = ["WANTED", "MAX_VALUE_LENGTH", "decode_values"]

#: Top-level attributes read from the header: tag -> keyword.
WANTED: dict[int, str] = {
    tag: keyword_for_tag(tag)
    for tag in (
        0x00080005,  # SpecificCharacterSet
        0x00080016,  # SOPClassUID
        0x00080018,  # SOPInstanceUID
        0x00080020,  # StudyDate
        0x00080021,  # SeriesDate
        0x00080030,  # StudyTime
        0x00080031,  # SeriesTime
        0x00080050,  # AccessionNumber
        0x00080060,  # Modality
        0x00080090,  # ReferringPhysicianName
        0x00081030,  # StudyDescription
        0x0008103E,  # SeriesDescription
        0x00100010,  # PatientName
        0x00100020,  # PatientID
        0x00100030,  # PatientBirthDate
        0x00100040,  # PatientSex
        0x0020000D,  # StudyInstanceUID
        0x0020000E,  # SeriesInstanceUID
        0x00200010,  # StudyID
        0x00200011,  # SeriesNumber
        0x00200013,  # InstanceNumber
        0x00280008,  # NumberOfFrames
        0x00280010,  # Rows
        0x00280011,  # Columns
        0x00280100,  # BitsAllocated
    )
}
#: Longer values are not kept by the walk (pydicom reads such a header).
MAX_VALUE_LENGTH = 1024

_VR = {tag: dictionary_VR(tag) for tag in WANTED}
#: Character sets in which printable ASCII means itself.
_PLAIN_CHARSETS = frozenset({"", "ISO_IR 6", "ISO_IR 100", "ISO_IR 192", "ISO 2022 IR 6"})
#: Printable ASCII and NUL padding, nothing else (no escape sequences, no controls).
_PLAIN = re.compile(rb"[\x20-\x7e\x00]*")
_INTEGER = re.compile(r"[ ]*[+-]?[0-9]+[ ]*")


def decode_values(
    raw: dict[int, tuple[bytes | None, bytes]], little: bool
) -> dict[str, str | int] | None:
    """Keyword -> value as :func:`emix_core.content.dicom` reads it from pydicom, or
    ``None`` when pydicom must decide.

    :param raw: tag -> (explicit VR or ``None`` when implicit, value bytes) from the walk.
    :param little: the data set is little endian.
    """
    values: dict[str, str | int] = {}
    for tag, (vr, data) in raw.items():
        expected = _VR[tag]
        if vr is not None and vr.decode("ascii") != expected:
            return None
        if expected == "US":
            if len(data) != 2:
                return None
            values[WANTED[tag]] = struct.unpack("<H" if little else ">H", data)[0]
            continue
        if _PLAIN.fullmatch(data) is None or b"\\" in data:
            return None
        text = data.decode("ascii").rstrip("\0 ")
        if expected == "IS" and text and _INTEGER.fullmatch(text) is None:
            return None
        values[WANTED[tag]] = text
    charset = str(values.get("SpecificCharacterSet", "")).replace("\0", "").strip()
    if charset not in _PLAIN_CHARSETS:
        return None
    return values
