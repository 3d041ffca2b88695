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
import json
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar

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


class BatchReader:
    """A file-like body that streams files as frames, hashing each as it goes.

    ``requests`` reads it in blocks and learns its length from ``len()``, so the
    upload carries a Content-Length and never holds more than one block in memory.
    After the upload, :attr:`digests` holds each item's SHA-256 (hex).
    """

    def __init__(
        self, items: Sequence[OutgoingItem], progress: Callable[[int], None] | None = None
    ) -> None:
        self.items = list(items)
        self.progress = progress
        self.digests: dict[int, str] = {}
        self._parts = self._generate()
        self._buffer = b""
        self._offset = 0
        self._length = sum(frame_size(i.id, i.size, i.media_type) for i in self.items) + len(
            END_MAGIC
        )

    def __len__(self) -> int:
        return self._length

    def _generate(self):  # type: ignore[no-untyped-def]
        for item in self.items:
            yield encode_header(item.id, item.size, item.media_type)
            digest = hashlib.sha256()
            remaining = item.size
            with open_regular(item.path) as handle:
                while remaining:
                    chunk = handle.read(min(1024 * 1024, remaining))
                    if not chunk:
                        raise OSError("a file shrank while it was being sent")
                    remaining -= len(chunk)
                    digest.update(chunk)
                    if self.progress:
                        self.progress(len(chunk))
                    yield chunk
            self.digests[item.id] = digest.hexdigest()
            yield digest.digest()
        yield END_MAGIC

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all that is left when negative)."""
        out = []
        wanted = size if size >= 0 else float("inf")
        while wanted > 0:
            if self._offset >= len(self._buffer):
                part = next(self._parts, None)
                if part is None:
                    break
                self._buffer, self._offset = part, 0
            take = self._buffer[self._offset : self._offset + int(min(wanted, 1 << 30))]
            self._offset += len(take)
            wanted -= len(take)
            out.append(take)
        return b"".join(out)


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
