"""One stored instance read forward, as it is decrypted: header, then frames.

The hub stores instances encrypted and hands them out as a stream of plaintext chunks.
:class:`StoredInstance` walks that stream element by element: the attributes before the
Pixel Data become a pydicom data set (a few kilobytes), and the pixel data is never held
whole. A native frame is cut out at its offset; an encapsulated one is put together from
its fragments. Memory stays at about one frame, whatever the size of the instance.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pydicom
from pydicom.dataset import Dataset

from emix_core import InvalidInput

__all__ = ["ForwardReader", "PixelLayout", "StoredInstance", "read_header"]

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
RLE = "1.2.840.10008.1.2.5"

PIXEL_DATA = 0x7FE00010
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF
LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
#: Attributes before the pixel data larger than this are refused (a hostile header).
MAX_HEADER_BYTES = 32 * 1024 * 1024
#: A deflated data set is read whole; the sender refuses more than 64 MiB inflated.
MAX_DEFLATED_BYTES = 64 * 1024 * 1024
MAX_DEPTH = 32


class ForwardReader:
    """A file-like reader over an iterator of chunks: read and skip forward only."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._buffer = b""
        self._at = 0  # read position in the buffer (no copying on each small read)
        self.position = 0

    def _available(self) -> int:
        return len(self._buffer) - self._at

    def _fill(self, n: int) -> None:
        while self._available() < n:
            chunk = next(self._chunks, None)
            if chunk is None:
                return
            self._buffer = self._buffer[self._at :] + chunk
            self._at = 0

    def read(self, n: int) -> bytes:
        self._fill(n)
        data = self._buffer[self._at : self._at + n]
        self._at += len(data)
        self.position += len(data)
        return data

    def exactly(self, n: int) -> bytes:
        data = self.read(n)
        if len(data) < n:
            raise InvalidInput("a stored instance ends early; ask the sender to send it again")
        return data

    def skip(self, n: int) -> None:
        while n > 0:
            if not self._available():
                self._fill(1)
                if not self._available():
                    raise InvalidInput("a stored instance ends early")
            step = min(n, self._available())
            self._at += step
            self.position += step
            n -= step

    def close(self) -> None:
        self._buffer, self._at = b"", 0
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()


@dataclass
class PixelLayout:
    """Where and how the pixel data is stored."""

    encapsulated: bool
    #: byte length of the native pixel data value (0 when encapsulated).
    length: int
    vr: str


class StoredInstance:
    """A stored instance opened for reading: :attr:`header` now, frames on demand.

    :param chunks: the plaintext of the Part 10 file, in order.
    """

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.reader = ForwardReader(chunks)
        try:
            raw, self.transfer_syntax, self.pixel = _split_header(self.reader)
        except _Deflated as deflated:
            # deflated data sets are small (the sender refuses more than 64 MiB inflated):
            # inflate this one in memory and go on from a plain copy of it
            self._from_whole(deflated.prefix + self.reader.read(MAX_DEFLATED_BYTES))
            return
        self.header = _parse(raw)

    def _from_whole(self, data: bytes) -> None:
        ds = _parse(data)
        self.transfer_syntax = DEFLATED_LE
        self.pixel = None
        element = ds.get("PixelData")
        if element is not None:
            ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(EXPLICIT_LE)
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            buffer.seek(0)
            self.reader = ForwardReader(iter(lambda: buffer.read(1024 * 1024), b""))
            raw, _, self.pixel = _split_header(self.reader)
            ds = _parse(raw)
        self.header = ds

    # -- frames -----------------------------------------------------------------------------

    @property
    def number_of_frames(self) -> int:
        if self.pixel is None:
            return 0
        try:
            return max(int(self.header.get("NumberOfFrames", 1) or 1), 1)
        except (TypeError, ValueError):
            return 1

    @property
    def frame_length(self) -> int:
        """Bytes of one native frame (0 when frames are not byte aligned)."""
        ds = self.header
        bits = int(ds.get("BitsAllocated", 0) or 0)
        pixels = int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0)
        pixels *= int(ds.get("SamplesPerPixel", 1) or 1)
        return pixels * bits // 8 if bits % 8 == 0 else 0

    def frames(self, wanted: Iterable[int]) -> Iterator[tuple[int, bytes]]:
        """The stored bytes of the wanted frames (0-based), in ascending order, once each."""
        if self.pixel is None:
            return
        indices = sorted(set(wanted))
        if not indices:
            return
        if self.pixel.encapsulated:
            yield from self._encapsulated(indices)
            return
        size = self.frame_length
        if not size and self.number_of_frames == 1 and indices == [0]:
            yield 0, self.reader.exactly(self.pixel.length)  # 1-bit pixels, one frame
            return
        if not size or size * self.number_of_frames > self.pixel.length:
            raise InvalidInput("the stored pixel data does not match its image attributes")
        at = 0
        for index in indices:
            self.reader.skip(index * size - at)
            yield index, self.reader.exactly(size)
            at = (index + 1) * size

    def _encapsulated(self, indices: list[int]) -> Iterator[tuple[int, bytes]]:
        count = self.number_of_frames
        fragments = self._fragments()
        table = next(fragments, (0, b""))[1]  # the Basic Offset Table
        offsets = list(struct.unpack(f"<{len(table) // 4}L", table)) if len(table) >= 4 else []
        extended = self.header.get("ExtendedOffsetTable")
        if extended is not None and not offsets:
            data = bytes(extended.value if hasattr(extended, "value") else extended)
            offsets = list(struct.unpack(f"<{len(data) // 8}Q", data))
        wanted = set(indices)
        frame, last = 0, max(indices)
        parts: list[bytes] = []
        for position, fragment in fragments:
            if offsets and frame + 1 < len(offsets) and position >= offsets[frame + 1]:
                if frame in wanted:
                    yield frame, b"".join(parts)
                frame, parts = frame + 1, []
            if frame > last:
                return
            parts.append(fragment if frame in wanted else b"")
            if not offsets and count > 1 and _frame_ends(self.transfer_syntax, fragment):
                if frame in wanted:
                    yield frame, b"".join(parts)
                frame, parts = frame + 1, []
                if frame > last:
                    return
        if parts and frame in wanted:
            yield frame, b"".join(parts)

    def _fragments(self) -> Iterator[tuple[int, bytes]]:
        """``(offset of the item from the first fragment, bytes)``; the table comes first."""
        first: int | None = None
        while True:
            tag, length = struct.unpack("<2L", self.reader.exactly(8))
            tag = (tag & 0xFFFF) << 16 | tag >> 16
            if tag == SEQUENCE_DELIMITER:
                return
            if tag != ITEM or length == UNDEFINED:
                raise InvalidInput("stored encapsulated pixel data without proper items")
            start = self.reader.position - 8
            data = self.reader.exactly(length)
            if first is None:
                first = -1  # the table
                yield 0, data
                continue
            if first == -1:
                first = start
            yield start - first, data

    def close(self) -> None:
        self.reader.close()


def _frame_ends(transfer_syntax: str, fragment: bytes) -> bool:
    """Without an offset table, a frame ends with its codestream's end marker (RLE: one
    fragment per frame, PS3.5 A.4.2)."""
    if transfer_syntax == RLE:
        return True
    return fragment.rstrip(b"\0")[-2:] == b"\xff\xd9"


def read_header(chunks: Iterable[bytes]) -> tuple[Dataset, str, PixelLayout | None]:
    """The attributes before the pixel data, the transfer syntax, the pixel layout; the
    stream is closed after the header."""
    stored = StoredInstance(chunks)
    stored.close()
    return stored.header, stored.transfer_syntax, stored.pixel


# -- the element walk -------------------------------------------------------------------------


def _parse(raw: bytes) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(io.BytesIO(raw), force=True)
        except Exception:  # hostile or odd input: no PHI in the message
            raise InvalidInput("a stored instance has an unreadable DICOM header") from None


def _split_header(reader: ForwardReader) -> tuple[bytes, str, PixelLayout | None]:
    """Copy the bytes up to the top-level Pixel Data; return them, the syntax, the layout."""
    out = bytearray()
    head = reader.read(132)
    if head[128:132] != b"DICM":
        # a data set without preamble or file meta (accepted by content when it was sent)
        explicit = len(head) >= 6 and head[4:6].isalpha() and head[4:6].isupper()
        syntax = EXPLICIT_LE if explicit else IMPLICIT_LE
        pixel = _Walker(reader, out, not explicit, "<", head).top_level()
        return bytes(out), syntax, pixel
    out += head
    syntax = ""
    while True:  # file meta: explicit VR little endian, group 0002
        peek = reader.read(2)
        if peek != b"\x02\x00":
            pending = peek
            break
        rest = reader.exactly(6)
        vr = rest[2:4]
        if vr in LONG_VRS:
            extra = reader.exactly(4)
            length = struct.unpack("<L", extra)[0]
            element = peek + rest + extra
        else:
            length = struct.unpack("<H", rest[4:6])[0]
            element = peek + rest
        value = reader.exactly(length)
        if rest[:2] == b"\x10\x00":
            syntax = value.decode("ascii", "replace").rstrip("\0 ")
        out += element + value
    if syntax == DEFLATED_LE:
        raise _Deflated(bytes(out) + pending)
    implicit = syntax == IMPLICIT_LE
    endian = ">" if syntax == EXPLICIT_BE else "<"
    walker = _Walker(reader, out, implicit, endian, pending)
    pixel = walker.top_level()
    return bytes(out), syntax or EXPLICIT_LE, pixel


class _Deflated(Exception):
    """A deflated data set cannot be walked forward; it is read whole instead."""

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix


class _Walker:
    def __init__(
        self, reader: ForwardReader, out: bytearray, implicit: bool, endian: str, pending: bytes
    ) -> None:
        self.reader, self.out = reader, out
        self.implicit, self.endian = implicit, endian
        self.pending = pending

    def _take(self, n: int) -> bytes:
        data = self.pending[:n]
        self.pending = self.pending[n:]
        if len(data) < n:
            data += self.reader.read(n - len(data))
        return data

    def _header(self, implicit: bool) -> tuple[int, bytes | None, int, bytes] | None:
        head = self._take(8)
        if len(head) < 8:
            return None
        group, elem = struct.unpack(self.endian + "HH", head[:4])
        tag = group << 16 | elem
        vr = head[4:6]
        if group == 0xFFFE or implicit or not (vr.isalpha() and vr.isupper()):
            return tag, None, struct.unpack(self.endian + "L", head[4:])[0], head
        if vr in LONG_VRS:
            extra = self._take(4)
            if len(extra) < 4:
                raise InvalidInput("a stored instance ends inside its header")
            return tag, vr, struct.unpack(self.endian + "L", extra)[0], head + extra
        return tag, vr, struct.unpack(self.endian + "H", head[6:])[0], head

    def _copy(self, n: int) -> None:
        if len(self.out) + n > MAX_HEADER_BYTES:
            raise InvalidInput("a stored instance has a header larger than 32 MiB")
        data = self._take(n)
        if len(data) < n:
            raise InvalidInput("a stored instance ends inside its header")
        self.out += data

    def top_level(self) -> PixelLayout | None:
        while True:
            header = self._header(self.implicit)
            if header is None:
                return None
            tag, vr, length, raw = header
            if tag in PIXEL_TAGS:
                shown = vr.decode() if vr else "OW"
                return PixelLayout(length == UNDEFINED, 0 if length == UNDEFINED else length, shown)
            self.out += raw
            self._value(tag, vr, length, 0)

    def _value(self, tag: int, vr: bytes | None, length: int, depth: int) -> None:
        if length != UNDEFINED:
            self._copy(length)
            return
        implicit = self.implicit or vr == b"UN"
        self._sequence(implicit, depth + 1)

    def _sequence(self, implicit: bool, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise InvalidInput("a stored instance nests sequences too deeply")
        while True:
            header = self._header(True)
            if header is None:
                raise InvalidInput("a stored instance ends inside a sequence")
            tag, _, length, raw = header
            self.out += raw
            if tag == SEQUENCE_DELIMITER:
                return
            if tag != ITEM:
                raise InvalidInput("a stored instance has a malformed sequence")
            if length != UNDEFINED:
                self._copy(length)
                continue
            while True:
                header = self._header(implicit)
                if header is None:
                    raise InvalidInput("a stored instance ends inside a sequence item")
                tag, vr, length, raw = header
                self.out += raw
                if tag == ITEM_DELIMITER:
                    break
                self._value(tag, vr, length, depth)
