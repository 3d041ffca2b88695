"""DICOM instances, recognised by content and checked without reading their pixel data.

A file is DICOM when its bytes say so (the ``DICM`` marker after the 128-byte preamble,
or a data set starting right at byte 0), never because of its name. Before emix sends an
instance it walks the file's structure element by element, reading only element headers
and seeking over values, so a truncated copy is caught without loading a single pixel:
a value that runs past the end of the file, encapsulated pixel data without its sequence
delimiter, or a file cut inside an element header all raise
:class:`~emix_core.errors.TruncatedDicomError`. pydicom then reads the few header
attributes emix needs, stopping before the pixel data — or, in the plain case (common
character sets, printable values), the walk keeps those few values on its way and
:mod:`emix_core.content.header` decodes them without a second read.

Error messages say what is wrong and what to do; they never contain the file's name (a
name such as ``SMITH_JOHN.dcm`` is PHI: callers that show a message to the file's owner
add the path themselves), a UID or any other value read from the file.
"""

from __future__ import annotations

import os
import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.multival import MultiValue
from pydicom.tag import Tag

from emix_core.content.header import MAX_VALUE_LENGTH, WANTED, decode_values
from emix_core.content.safe_open import open_regular
from emix_core.content.uids import UID_RE, is_valid_uid  # noqa: F401 - re-exported
from emix_core.errors import InvalidInput, NotDicomError, TruncatedDicomError

__all__ = ["DicomInstance", "inspect_instance", "is_dicom", "is_valid_uid"]

PREAMBLE_LENGTH = 128
MAGIC = b"DICM"
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"

#: A deflated data set is inflated in memory by pydicom; refuse bigger ones.
MAX_INFLATED_BYTES = 64 * 1024 * 1024
#: Deeper nesting than this is an attack, not an image.
MAX_SEQUENCE_DEPTH = 32
SNIFF_BYTES = 4096
REMEDY = "re-export the study from the modality/PACS"

UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
#: Pixel Data, Float Pixel Data, Double Float Pixel Data.
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
DIRECTORY_RECORDS = 0x00041220
TRANSFER_SYNTAX = 0x00020010
MEDIA_STORAGE_SOP_CLASS = 0x00020002
ROWS = 0x00280010

VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL "
    b"UN UR US UT UV".split()
)
#: Explicit VRs whose length is 4 bytes, after 2 reserved bytes.
LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())

#: Attributes read from the header (everything else is skipped, not loaded).
HEADER_TAGS = [
    Tag(keyword)
    for keyword in (
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyDate",
        "AccessionNumber",
        "Modality",
        "StudyDescription",
        "PatientName",
        "PatientID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SeriesNumber",
        "InstanceNumber",
        "SpecificCharacterSet",
        "StudyTime",
        "StudyID",
        "ReferringPhysicianName",
        "PatientBirthDate",
        "PatientSex",
        "SeriesDescription",
        "SeriesDate",
        "SeriesTime",
        "Rows",
        "Columns",
        "BitsAllocated",
        "NumberOfFrames",
    )
]


@dataclass
class DicomInstance:
    """What emix needs to know about one DICOM instance (PHI: never log these values).

    :param study_uid: Study Instance UID (0020,000D).
    :param series_uid: Series Instance UID (0020,000E).
    :param sop_instance_uid: SOP Instance UID (0008,0018).
    :param sop_class_uid: SOP Class UID (0008,0016), or the file meta's, or ``""``.
    :param transfer_syntax_uid: from the file meta, or the encoding found in a raw data set.
    :param modality: Modality (0008,0060), ``""`` when absent.
    :param accession_number: Accession Number (0008,0050).
    :param patient_id: Patient ID (0010,0020).
    :param patient_name: Patient's Name (0010,0010) as DICOM writes it (``FAMILY^GIVEN``).
    :param study_date: Study Date (0008,0020), ``YYYYMMDD`` or ``""``.
    :param study_description: Study Description (0008,1030).
    :param series_number: Series Number (0020,0011), ``None`` when absent or not a number.
    :param instance_number: Instance Number (0020,0013), ``None`` likewise.
    :param size: size of the file in bytes.
    :param specific_character_set: Specific Character Set (0008,0005), ``""`` for the default.
    :param study_time: Study Time (0008,0030).
    :param study_id: Study ID (0020,0010).
    :param referring_physician_name: Referring Physician's Name (0008,0090).
    :param patient_birth_date: Patient's Birth Date (0010,0030).
    :param patient_sex: Patient's Sex (0010,0040).
    :param series_description: Series Description (0008,103E).
    :param series_date: Series Date (0008,0021).
    :param series_time: Series Time (0008,0031).
    :param rows: Rows (0028,0010), ``None`` when not an image.
    :param columns: Columns (0028,0011).
    :param bits_allocated: Bits Allocated (0028,0100).
    :param number_of_frames: Number of Frames (0028,0008), 1 for a single-frame image.
    """

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str
    accession_number: str
    patient_id: str
    patient_name: str
    study_date: str
    study_description: str
    series_number: int | None
    instance_number: int | None
    size: int
    specific_character_set: str = ""
    study_time: str = ""
    study_id: str = ""
    referring_physician_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    series_description: str = ""
    series_date: str = ""
    series_time: str = ""
    rows: int | None = None
    columns: int | None = None
    bits_allocated: int | None = None
    number_of_frames: int | None = None


def is_dicom(path: Path) -> bool:
    """True when the content of ``path`` is DICOM, whatever its name.

    Recognises Part 10 files (128-byte preamble and ``DICM``) and raw data sets without
    preamble that start with group 0002 or 0008 elements in explicit or implicit VR little
    endian (or explicit VR big endian), checking several elements so that random bytes,
    PDFs or text are not taken for DICOM.

    :raises OSError: the file cannot be read.
    """
    with open_regular(path) as fp:
        head = fp.read(SNIFF_BYTES)
        size = _size(fp)
    return _has_part10_marker(head) or _raw_encoding(head, size) is not None


def inspect_instance(path: Path) -> DicomInstance:
    """Read the header of the DICOM instance at ``path`` and check the file is complete.

    Only element headers and the attributes of :class:`DicomInstance` are read; the pixel
    data is sought over, never loaded.

    :raises NotDicomError: the content is not DICOM.
    :raises TruncatedDicomError: the file ends before its declared content does.
    :raises InvalidInput: a DICOMDIR, a malformed file, a missing or malformed UID.
    :raises OSError: the file cannot be read.
    """
    with open_regular(path) as fp:
        head = fp.read(SNIFF_BYTES)
        size = _size(fp)
        if _has_part10_marker(head):
            start = PREAMBLE_LENGTH + len(MAGIC)
        elif _raw_encoding(head, size) is not None:
            start = 0
        else:
            raise NotDicomError(
                f"not a DICOM file (no DICM marker and no DICOM data set at its start); "
                f"if it is an image, {REMEDY}"
            )
        fp.seek(start)
        try:
            structure = _check_structure(fp, size)
        except _Truncated as exc:
            raise TruncatedDicomError(
                f"truncated DICOM file (it ends inside its {exc.where}); {REMEDY}"
            ) from None
        except _Malformed as exc:
            raise InvalidInput(f"malformed DICOM ({exc.what}); {REMEDY}") from None
    values = None if structure.long_value else decode_values(structure.values, structure.little)
    with warnings.catch_warnings():
        # pydicom warns about odd values; the checks below decide, and warnings may hold PHI
        warnings.simplefilter("ignore")
        if values is not None:  # the plain case: the walk kept what is needed
            return _instance(values.get, structure.meta_sop_class, structure, size)
        ds = _read_header(path)
        meta = getattr(ds, "file_meta", None) or pydicom.Dataset()
        meta_sop_class = _uid(meta.get("MediaStorageSOPClassUID"))
        return _instance(ds.get, meta_sop_class, structure, size)


# -- recognising DICOM ------------------------------------------------------------------


def _has_part10_marker(head: bytes) -> bool:
    return head[PREAMBLE_LENGTH : PREAMBLE_LENGTH + len(MAGIC)] == MAGIC


def _raw_encoding(head: bytes, size: int) -> tuple[bool, bool] | None:
    """``(implicit, little_endian)`` when ``head`` starts with a plausible data set."""
    for implicit, little in ((False, True), (True, True), (False, False)):
        if _plausible_elements(head, size, implicit, little):
            return implicit, little
    return None


def _plausible_elements(head: bytes, size: int, implicit: bool, little: bool) -> bool:
    """Check the first elements: known group, ascending tags, known VRs, even lengths
    that fit in the file. Random bytes fail one of these almost at once."""
    endian = "<" if little else ">"
    pos, previous, checked = 0, -1, 0
    while checked < 4:
        if pos == size and checked:
            return True
        if pos + 8 > len(head):
            return checked >= 2
        group, elem = struct.unpack_from(endian + "HH", head, pos)
        tag = group << 16 | elem
        if checked == 0 and group not in (0x0002, 0x0008):
            return False
        if group == 0x0002 and not (little and not implicit):
            return False
        if tag <= previous or group == 0xFFFE:
            return False
        if implicit:
            (length,) = struct.unpack_from(endian + "L", head, pos + 4)
            header = 8
        else:
            vr = head[pos + 4 : pos + 6]
            if vr not in VRS:
                return False
            if vr in LONG_VRS:
                if pos + 12 > len(head) or head[pos + 6 : pos + 8] != b"\0\0":
                    return False
                (length,) = struct.unpack_from(endian + "L", head, pos + 8)
                header = 12
            else:
                (length,) = struct.unpack_from(endian + "H", head, pos + 6)
                header = 8
        checked += 1
        if length == UNDEFINED_LENGTH:
            return True  # a sequence: the elements before it were consistent
        if length % 2 or pos + header + length > size:
            return False
        pos, previous = pos + header + length, tag
    return True


# -- structure walk ---------------------------------------------------------------------


class _Truncated(Exception):
    def __init__(self, where: str) -> None:
        self.where = where


class _Malformed(Exception):
    def __init__(self, what: str) -> None:
        self.what = what


@dataclass
class _Structure:
    transfer_syntax: str
    is_dicomdir: bool = False
    has_rows: bool = False
    has_pixel_data: bool = False
    little: bool = True
    meta_sop_class: str = ""
    #: short top-level values of :data:`~emix_core.content.header.WANTED`: tag -> (VR, bytes)
    values: dict[int, tuple[bytes | None, bytes]] = field(default_factory=dict)
    #: one of them was too long to keep (pydicom reads the header)
    long_value: bool = False


class _FileSource:
    """Reads element headers from a file and seeks over values, checking the bounds."""

    def __init__(self, fp: BinaryIO, size: int) -> None:
        self.fp, self.size = fp, size

    def read(self, n: int) -> bytes:
        return self.fp.read(n)

    def skip(self, n: int, where: str) -> None:
        position = self.fp.tell()
        if position + n > self.size:
            raise _Truncated(where)
        self.fp.seek(position + n)


class _InflateSource:
    """A deflated data set, inflated a chunk at a time and never kept whole."""

    CHUNK = 64 * 1024

    def __init__(self, fp: BinaryIO) -> None:
        self.fp = fp
        self.inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self.buffer = b""
        self.position = 0
        self.inflated = 0

    def _fill(self, n: int) -> None:
        while len(self.buffer) - self.position < n and not self.inflater.eof:
            compressed = self.inflater.unconsumed_tail or self.fp.read(self.CHUNK)
            if not compressed:
                return
            try:
                data = self.inflater.decompress(compressed, self.CHUNK)
            except zlib.error:
                raise _Malformed("corrupt deflated data set") from None
            self.inflated += len(data)
            if self.inflated > MAX_INFLATED_BYTES:
                raise _Malformed("deflated data set larger than 64 MiB")
            self.buffer = self.buffer[self.position :] + data
            self.position = 0

    def read(self, n: int) -> bytes:
        self._fill(n)
        data = self.buffer[self.position : self.position + n]
        self.position += len(data)
        return data

    def skip(self, n: int, where: str) -> None:
        while n:
            step = min(n, self.CHUNK)
            if len(self.read(step)) < step:
                raise _Truncated(where)
            n -= step

    def check_complete(self) -> None:
        self._fill(1)
        if not self.inflater.eof:
            raise _Truncated("deflated data set")


def _check_structure(fp: BinaryIO, size: int) -> _Structure:
    """Walk the file meta and the data set from the current position to the end."""
    transfer_syntax, meta_sop_class = _walk_file_meta(fp, size)
    _skip_command_set(fp, size)
    structure = _Structure(transfer_syntax or "", meta_sop_class=meta_sop_class)
    if transfer_syntax == DEFLATED_LE:
        inflate = _InflateSource(fp)
        _walk_dataset(inflate, implicit=False, little=True, depth=0, facts=structure)
        inflate.check_complete()
        return structure
    little = transfer_syntax != EXPLICIT_BE
    first = fp.read(8)
    fp.seek(-len(first), 1)
    if transfer_syntax is None and len(first) == 8:
        # no transfer syntax: guess like pydicom does, from the first element
        little = first[4:6] not in VRS or struct.unpack("<H", first[:2])[0] < 1024
    implicit = not _is_vr(first[4:6]) if len(first) == 8 else True
    structure.little = little
    if not structure.transfer_syntax:
        structure.transfer_syntax = (
            IMPLICIT_LE if implicit else EXPLICIT_LE if little else EXPLICIT_BE
        )
    _walk_dataset(_FileSource(fp, size), implicit, little, depth=0, facts=structure)
    return structure


def _walk_file_meta(fp: BinaryIO, size: int) -> tuple[str | None, str]:
    """Skip group 0002 (explicit VR little endian), returning its Transfer Syntax UID and
    Media Storage SOP Class UID."""
    source = _FileSource(fp, size)
    transfer_syntax, sop_class = None, ""
    while True:
        peek = fp.read(2)
        fp.seek(-len(peek), 1)
        if len(peek) < 2 or struct.unpack("<H", peek)[0] != 0x0002:
            return transfer_syntax, sop_class
        tag, _, length = _header(source, implicit=False, little=True)
        if length == UNDEFINED_LENGTH:
            raise _Malformed("undefined length in the file meta information")
        if tag in (TRANSFER_SYNTAX, MEDIA_STORAGE_SOP_CLASS) and length <= 128:
            value = fp.read(length)
            if len(value) < length:
                raise _Truncated("DICOM header")
            uid = value.decode("ascii", "replace").rstrip("\0 ")
            if tag == TRANSFER_SYNTAX:
                transfer_syntax = uid
            else:
                sop_class = uid
        else:
            source.skip(length, "DICOM header")


def _skip_command_set(fp: BinaryIO, size: int) -> None:
    """Skip group 0000 elements (implicit VR little endian), as pydicom does."""
    source = _FileSource(fp, size)
    while True:
        peek = fp.read(2)
        fp.seek(-len(peek), 1)
        if len(peek) < 2 or peek != b"\0\0":
            return
        _, _, length = _header(source, implicit=True, little=True)
        if length == UNDEFINED_LENGTH:
            raise _Malformed("undefined length in the command set")
        source.skip(length, "DICOM header")


def _is_vr(raw: bytes) -> bool:
    return len(raw) == 2 and 0x40 < raw[0] < 0x5B and 0x40 < raw[1] < 0x5B


def _element_header(
    source: _FileSource | _InflateSource, implicit: bool, little: bool, at_end_ok: bool = False
) -> tuple[int, bytes | None, int] | None:
    """Read one element header: ``(tag, vr or None, length)``.

    With ``at_end_ok``, a clean end of file (or a few zero padding bytes) returns ``None``.
    """
    head = source.read(8)
    if len(head) < 8:
        if at_end_ok and not head.strip(b"\0"):
            return None
        raise _Truncated("DICOM header")
    endian = "<" if little else ">"
    group, elem = struct.unpack_from(endian + "HH", head)
    tag = group << 16 | elem
    vr = head[4:6]
    if group == 0xFFFE or implicit or not _is_vr(vr):
        # items and delimiters have no VR; an explicit data set may switch to implicit
        return tag, None, struct.unpack_from(endian + "L", head, 4)[0]
    if vr in LONG_VRS:
        extra = source.read(4)
        if len(extra) < 4:
            raise _Truncated("DICOM header")
        return tag, vr, struct.unpack(endian + "L", extra)[0]
    return tag, vr, struct.unpack_from(endian + "H", head, 6)[0]


def _header(
    source: _FileSource | _InflateSource, implicit: bool, little: bool
) -> tuple[int, bytes | None, int]:
    header = _element_header(source, implicit, little)
    assert header is not None  # only None when at_end_ok
    return header


def _walk_dataset(
    source: _FileSource | _InflateSource,
    implicit: bool,
    little: bool,
    depth: int,
    facts: _Structure,
    in_item: bool = False,
) -> None:
    """Walk elements until the end of the file (top level) or of the current item."""
    while True:
        header = _element_header(source, implicit, little, at_end_ok=not in_item)
        if header is None:
            return
        tag, vr, length = header
        if tag == ITEM_DELIMITER and in_item:
            return
        if depth == 0 and tag == DIRECTORY_RECORDS:
            facts.is_dicomdir = True
        if depth == 0:
            facts.has_rows |= tag == ROWS
            facts.has_pixel_data |= tag in PIXEL_TAGS
            if tag in WANTED and length <= MAX_VALUE_LENGTH:
                value = source.read(length)
                if len(value) < length:
                    raise _Truncated("DICOM header")
                facts.values[tag] = (vr, value)
                continue
            facts.long_value |= tag in WANTED
        if length != UNDEFINED_LENGTH:
            source.skip(length, "pixel data" if tag == PIXEL_DATA else "DICOM header")
        elif tag == PIXEL_DATA:
            _walk_fragments(source, little)
        elif vr == b"UN":
            # UN of undefined length: a sequence in implicit VR little endian (PS3.5 6.2.2)
            _walk_sequence(source, True, True, depth + 1, facts)
        else:
            _walk_sequence(source, implicit, little, depth + 1, facts)


def _walk_sequence(
    source: _FileSource | _InflateSource,
    implicit: bool,
    little: bool,
    depth: int,
    facts: _Structure,
) -> None:
    if depth > MAX_SEQUENCE_DEPTH:
        raise _Malformed("sequences nested too deeply")
    while True:
        tag, _, length = _header(source, implicit=True, little=little)
        if tag == SEQUENCE_DELIMITER:
            return
        if tag != ITEM:
            raise _Malformed("unexpected element inside a sequence")
        if length == UNDEFINED_LENGTH:
            _walk_dataset(source, implicit, little, depth, facts, in_item=True)
        else:
            source.skip(length, "DICOM header")


def _walk_fragments(source: _FileSource | _InflateSource, little: bool) -> None:
    """Seek over the fragments of encapsulated pixel data up to the sequence delimiter."""
    while True:
        try:
            tag, _, length = _header(source, implicit=True, little=little)
        except _Truncated:
            raise _Truncated("compressed pixel data") from None
        if tag == SEQUENCE_DELIMITER:
            return
        if tag != ITEM or length == UNDEFINED_LENGTH:
            raise _Malformed("encapsulated pixel data without proper items")
        source.skip(length, "compressed pixel data")


# -- header values ----------------------------------------------------------------------


def _read_header(path: Path) -> pydicom.Dataset:
    """The attributes emix needs, read by pydicom, stopping before the pixel data."""
    try:
        with open_regular(path) as fp:
            return pydicom.dcmread(
                fp, force=True, stop_before_pixels=True, specific_tags=HEADER_TAGS
            )
    except OSError:
        raise
    except Exception:  # pydicom raises many types on hostile input; none is PHI-safe
        raise InvalidInput(f"unreadable DICOM header; {REMEDY}") from None


def _instance(
    get: Callable[[str], object], meta_sop_class: str, structure: _Structure, size: int
) -> DicomInstance:
    """The instance from its header values (``get(keyword)``), checked."""
    try:
        sop_class = _uid(get("SOPClassUID")) or meta_sop_class
        if structure.is_dicomdir or sop_class == DICOMDIR_SOP_CLASS:
            raise InvalidInput(
                "a DICOMDIR index, not an image; import the CD with the cd_import adapter"
            )
        if (
            structure.has_rows
            and not structure.has_pixel_data
            and "Image Storage" in pydicom.uid.UID(sop_class).name
        ):
            # an image that declares its size but has no pixels: a copy cut exactly between
            # two elements (images stripped of the whole pixel module are left alone)
            raise TruncatedDicomError(
                f"truncated DICOM file (it ends before its pixel data); {REMEDY}"
            )
        uids = {
            "StudyInstanceUID": _uid(get("StudyInstanceUID")),
            "SeriesInstanceUID": _uid(get("SeriesInstanceUID")),
            "SOPInstanceUID": _uid(get("SOPInstanceUID")),
        }
        for keyword, uid in uids.items():
            if not uid:
                raise InvalidInput(
                    f"DICOM file without {keyword}, so it cannot be filed in a study; {REMEDY}"
                )
        others = {"SOPClassUID": sop_class, "TransferSyntaxUID": structure.transfer_syntax}
        for keyword, uid in (uids | others).items():
            if uid and not is_valid_uid(uid):
                raise InvalidInput(f"hostile or malformed UID in {keyword}; {REMEDY}")
        return DicomInstance(
            study_uid=uids["StudyInstanceUID"],
            series_uid=uids["SeriesInstanceUID"],
            sop_instance_uid=uids["SOPInstanceUID"],
            sop_class_uid=sop_class,
            transfer_syntax_uid=structure.transfer_syntax,
            modality=_text(get("Modality")),
            accession_number=_text(get("AccessionNumber")),
            patient_id=_text(get("PatientID")),
            patient_name=_text(get("PatientName")),
            study_date=_text(get("StudyDate")),
            study_description=_text(get("StudyDescription")),
            series_number=_number(get("SeriesNumber")),
            instance_number=_number(get("InstanceNumber")),
            size=size,
            specific_character_set=_text(get("SpecificCharacterSet")),
            study_time=_text(get("StudyTime")),
            study_id=_text(get("StudyID")),
            referring_physician_name=_text(get("ReferringPhysicianName")),
            patient_birth_date=_text(get("PatientBirthDate")),
            patient_sex=_text(get("PatientSex")),
            series_description=_text(get("SeriesDescription")),
            series_date=_text(get("SeriesDate")),
            series_time=_text(get("SeriesTime")),
            rows=_number(get("Rows")),
            columns=_number(get("Columns")),
            bits_allocated=_number(get("BitsAllocated")),
            number_of_frames=(
                (_number(get("NumberOfFrames")) or 1) if structure.has_pixel_data else None
            ),
        )
    except InvalidInput:  # TruncatedDicomError included
        raise
    except Exception:  # a value pydicom cannot decode (bad character set, bad number...)
        raise InvalidInput(f"undecodable DICOM header value; {REMEDY}") from None


def _uid(value: object) -> str:
    """A UID exactly as read (pydicom already dropped the trailing padding); a multi-valued
    one is joined back with ``\\`` so that validation refuses it."""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def _text(value: object) -> str:
    """A descriptive value as text, without NUL padding."""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value).replace("\0", "").strip()
    return str(value).replace("\0", "").strip()


def _number(value: object) -> int | None:
    try:
        return int(str(value).strip()) if value not in (None, "") else None
    except ValueError:
        return None


def _size(fp: BinaryIO) -> int:
    return os.fstat(fp.fileno()).st_size
