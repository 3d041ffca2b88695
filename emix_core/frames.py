"""The batch upload format: many items in one streamed request body.

One HTTP request per item costs more than encrypting it; a batch carries many::

    batch  = frame* b"EMXE"
    frame  = b"EMXI" + u32 BE header length + header JSON + item bytes + SHA-256 (32 bytes)
    header = {"id": int, "size": int, "media_type": str}

The digest follows the bytes, so the sender reads each file once: it hashes while it
streams, and the hub compares. A frame whose bytes do not match its digest is not
stored; the rest of the batch is.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar, cast

from emix_core.content.safe_open import open_regular
from emix_core.errors import InvalidInput

MEDIA_TYPE = "application/vnd.emix.items"
FRAME_MAGIC = b"EMXI"
END_MAGIC = b"EMXE"
MAX_HEADER = 4096
DIGEST_SIZE = 32
#: Batches carry up to this many bytes or items per request.
BATCH_BYTES = 32 * 1024 * 1024
BATCH_ITEMS = 512


@dataclass
class FrameHeader:
    id: int
    size: int
    media_type: str


def encode_header(item_id: int, size: int, media_type: str) -> bytes:
    header = json.dumps({"id": item_id, "size": size, "media_type": media_type}).encode()
    return FRAME_MAGIC + struct.pack(">I", len(header)) + header


def frame_size(item_id: int, size: int, media_type: str) -> int:
    """Bytes one frame takes: header, item bytes, digest."""
    return len(encode_header(item_id, size, media_type)) + size + DIGEST_SIZE


def read_exactly(stream: BinaryIO, size: int) -> bytes:
    """Read ``size`` bytes (fewer only at the end of the stream)."""
    parts = []
    while size > 0:
        chunk = stream.read(size)
        if not chunk:
            break
        parts.append(chunk)
        size -= len(chunk)
    return b"".join(parts)


def read_header(stream: BinaryIO) -> FrameHeader | None:
    """The next frame's header, or ``None`` at the end marker."""
    magic = read_exactly(stream, 4)
    if magic == END_MAGIC:
        return None
    if magic != FRAME_MAGIC:
        raise InvalidInput("malformed batch upload: expected a frame marker")
    raw_length = read_exactly(stream, 4)
    if len(raw_length) != 4:
        raise InvalidInput("malformed batch upload: the stream ends inside a frame header")
    (length,) = struct.unpack(">I", raw_length)
    if not 0 < length <= MAX_HEADER:
        raise InvalidInput("malformed batch upload: bad frame header length")
    try:
        data = json.loads(read_exactly(stream, length))
        header = FrameHeader(int(data["id"]), int(data["size"]), str(data["media_type"])[:100])
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInput("malformed batch upload: bad frame header") from exc
    if header.size < 0:
        raise InvalidInput("malformed batch upload: negative size")
    return header


class ByteCounter:
    """Thread-safe running total of bytes moved, reported as ``progress(done, total)``."""

    def __init__(self, total: int, progress: Callable[[int, int], None] | None) -> None:
        self.total = total
        self.done = 0
        self._progress = progress
        self._lock = threading.Lock()

    def __call__(self, count: int) -> None:
        with self._lock:
            self.done += count
            if self._progress:
                self._progress(self.done, self.total)


class Sized(Protocol):
    size: int


T = TypeVar("T", bound=Sized)


def batches(items: Sequence[T], max_bytes: int = BATCH_BYTES) -> list[list[T]]:
    """Group items, in order, into batches of at most ``max_bytes`` (or one large item)."""
    groups: list[list[T]] = []
    size = 0
    for item in items:
        if not groups or size + item.size > max_bytes or len(groups[-1]) >= BATCH_ITEMS:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item.size
    return groups


@dataclass
class OutgoingItem:
    """One file to send in a batch."""

    id: int
    path: Path
    size: int
    media_type: str


#: Bytes of the file read at a time when sending a batch (one socket write each).
SEND_BLOCK = 1024 * 1024


class BatchReader:
    """A file-like body that streams files as frames, hashing each as it goes.

    ``requests`` reads it in blocks and learns its length from ``len()``, so the
    upload carries a Content-Length and never holds more than one block in memory.
    After the upload, :attr:`digests` holds each item's SHA-256 (hex).

    Files are read into one reused buffer, hashed there and handed on from there; small
    frames share a block (headers and digests travel with file bytes, not as writes of
    their own). With ``views``, :meth:`read` returns a memoryview of that buffer, valid
    until the next read: no copy at all between the file and the socket.
    """

    def __init__(
        self,
        items: Sequence[OutgoingItem],
        progress: Callable[[int], None] | None = None,
        *,
        views: bool = False,
    ) -> None:
        self.items = list(items)
        self.progress = progress
        self.views = views
        self.digests: dict[int, str] = {}
        self._blocks = self._generate()
        self._block = memoryview(b"")
        self._length = sum(frame_size(i.id, i.size, i.media_type) for i in self.items) + len(
            END_MAGIC
        )

    def __len__(self) -> int:
        return self._length

    def _generate(self) -> Iterator[memoryview]:
        # room for one block of file bytes, a frame header before it, a digest and the
        # end marker after it
        view = memoryview(bytearray(SEND_BLOCK + 8 + MAX_HEADER + DIGEST_SIZE + len(END_MAGIC)))
        fill = 0
        for item in self.items:
            header = encode_header(item.id, item.size, item.media_type)
            view[fill : fill + len(header)] = header
            fill += len(header)
            digest = hashlib.sha256()
            remaining = item.size
            with open_regular(item.path, buffering=0) as opened:
                handle = cast(io.RawIOBase, opened)  # unbuffered: readinto, no copy
                while remaining:
                    if fill >= SEND_BLOCK:
                        yield view[:fill]
                        fill = 0
                    got = handle.readinto(view[fill : fill + min(SEND_BLOCK - fill, remaining)])
                    if not got:
                        raise OSError("a file shrank while it was being sent")
                    digest.update(view[fill : fill + got])
                    fill += got
                    remaining -= got
                    if self.progress:
                        self.progress(got)
            view[fill : fill + DIGEST_SIZE] = digest.digest()
            fill += DIGEST_SIZE
            self.digests[item.id] = digest.hexdigest()
            if fill >= SEND_BLOCK:
                yield view[:fill]
                fill = 0
        view[fill : fill + len(END_MAGIC)] = END_MAGIC
        yield view[: fill + len(END_MAGIC)]

    def read(self, size: int = -1) -> bytes | memoryview:
        """Up to ``size`` bytes (all that is left when negative); empty at the end."""
        if size < 0:
            return b"".join(bytes(block) for block in self._rest())
        while not self._block:
            block = next(self._blocks, None)
            if block is None:
                return b""
            self._block = block
        out, self._block = self._block[:size], self._block[size:]
        return out if self.views else bytes(out)

    def _rest(self) -> Iterator[memoryview]:
        if self._block:
            yield self._block
            self._block = memoryview(b"")
        yield from self._blocks


def receive_frames(
    stream: BinaryIO,
    open_target: Callable[[FrameHeader], BinaryIO],
    progress: Callable[[int], None] | None = None,
) -> dict[int, str]:
    """Write each frame of a batch stream to the file ``open_target`` gives for it.

    :return: ``{id: sha256}`` of the bytes actually received (compare them with the
        signed manifest; the digest the sender put after each frame is checked too).
    :raises IntegrityError: the stream ended early or a frame's digest does not match.
    """
    from emix_core.errors import IntegrityError

    digests: dict[int, str] = {}
    while (header := _next_header(stream)) is not None:
        digest = hashlib.sha256()
        remaining = header.size
        target = open_target(header)
        while remaining:
            chunk = stream.read(min(1024 * 1024, remaining))
            if not chunk:
                raise IntegrityError(
                    "the download was cut off (integrity check failed on the "
                    "hub, or the connection was lost); nothing was kept"
                )
            remaining -= len(chunk)
            digest.update(chunk)
            target.write(chunk)
            if progress:
                progress(len(chunk))
        if read_exactly(stream, DIGEST_SIZE) != digest.digest():
            raise IntegrityError("a downloaded item does not match its digest; nothing was kept")
        digests[header.id] = digest.hexdigest()
    return digests


def _next_header(stream: BinaryIO) -> FrameHeader | None:
    from emix_core.errors import IntegrityError

    try:
        return read_header(stream)
    except InvalidInput as exc:
        raise IntegrityError("the download was cut off or garbled; nothing was kept") from exc


def results(body: dict[str, Any]) -> tuple[list[int], dict[int, str]]:
    """Split the hub's answer into stored ids and ``{id: error}``."""
    return body.get("stored", []), {int(f["id"]): f["error"] for f in body.get("failed", [])}
