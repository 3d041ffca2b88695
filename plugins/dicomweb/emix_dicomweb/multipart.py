"""Streaming ``multipart/related`` (RFC 2387), the envelope of WADO-RS and STOW-RS.

Both directions hold at most one network chunk (plus a boundary's length) in memory,
never a whole instance: :func:`iter_multipart` splits an incoming byte stream into
parts event by event, and :class:`MultipartBody` is a file-like request body that reads
the instance files from disk as the HTTP library sends them.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import BinaryIO

from emix_core import InvalidInput

__all__ = [
    "MultipartBody",
    "PartEnd",
    "PartHeaders",
    "boundary_of",
    "iter_multipart",
    "media_type_parameters",
]

MAX_HEADER_BYTES = 16 * 1024


@dataclass
class PartHeaders:
    """A part begins: its headers (names lower-cased)."""

    headers: dict[str, str]


@dataclass
class PartEnd:
    """The current part is complete."""


#: RFC 2046 section 5.1.1: 1 to 70 of these characters, not ending in a space (longer
#: boundaries are tolerated up to 200, as some servers send them).
_BOUNDARY_RE = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]*[0-9A-Za-z'()+_,\-./:=?]")


def media_type_parameters(value: str) -> tuple[str, dict[str, str]]:
    """Split a ``Content-Type`` value into its media type and parameters (lower-case keys)."""
    message = Message()
    message["content-type"] = value
    params = {k.lower(): v for k, v in message.get_params(failobj=[])[1:]}
    return message.get_content_type(), params


def boundary_of(content_type: str) -> bytes:
    """The boundary of a ``multipart/related`` content type.

    :raises InvalidInput: not multipart, or no usable boundary.
    """
    media_type, params = media_type_parameters(content_type)
    boundary = params.get("boundary", "")
    if not media_type.startswith("multipart/") or not 0 < len(boundary) <= 200:
        raise InvalidInput(f"expected a multipart answer with a boundary, got {media_type!r}")
    if not isinstance(boundary, str) or not _BOUNDARY_RE.fullmatch(boundary):  # RFC 2231 tuple
        raise InvalidInput("the multipart answer's boundary has characters RFC 2046 forbids")
    return boundary.encode("ascii")


def iter_multipart(
    chunks: Iterable[bytes], boundary: bytes
) -> Iterator[PartHeaders | bytes | PartEnd]:
    """Split a multipart stream: per part a :class:`PartHeaders`, its body as ``bytes``
    pieces, then a :class:`PartEnd`.

    :raises InvalidInput: the stream ends early or a part's headers are malformed.
    """
    delimiter = b"\r\n--" + boundary
    buffer = bytearray(b"\r\n")  # the first boundary line may start the stream
    stream = iter(chunks)
    ended = False

    def fill() -> bool:
        nonlocal ended
        for chunk in stream:
            if chunk:
                buffer.extend(chunk)
                return True
        ended = True
        return False

    # preamble: skip to the first delimiter
    while True:
        at = buffer.find(delimiter)
        if at >= 0:
            del buffer[: at + len(delimiter)]
            break
        del buffer[: max(len(buffer) - len(delimiter), 0)]
        if not fill():
            raise InvalidInput("the multipart answer holds no part (boundary not found)")
    while True:
        # after a delimiter: "--" closes the message, else the line ends and headers follow
        while len(buffer) < 2 and fill():
            pass
        if buffer[:2] == b"--":
            return
        if ended and not buffer:
            raise InvalidInput("the multipart answer ends without its closing boundary")
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            if len(buffer) > MAX_HEADER_BYTES:
                raise InvalidInput("a multipart part has oversized headers")
            if not fill():
                raise InvalidInput("the multipart answer ends inside a part's headers")
        yield PartHeaders(_parse_headers(bytes(buffer[:end])))
        del buffer[: end + 4]
        while True:
            at = buffer.find(delimiter)
            if at >= 0:
                if at:
                    yield bytes(buffer[:at])
                del buffer[: at + len(delimiter)]
                yield PartEnd()
                break
            keep = len(delimiter) - 1
            if len(buffer) > keep:
                yield bytes(buffer[:-keep])
                del buffer[:-keep]
            if not fill():
                raise InvalidInput("the multipart answer ends inside a part (cut off?)")


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.decode("latin-1").split("\r\n"):
        if not line.strip():
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise InvalidInput("a multipart part has a malformed header line")
        headers[name.strip().lower()] = value.strip()
    return headers


class MultipartBody:
    """A ``multipart/related; type="application/dicom"`` request body read from files.

    It has a length (so the request carries ``Content-Length``) and reads each file
    only when the HTTP library asks for its bytes. Files must not change while sent.

    :param files: the instance files, sent byte for byte as they are on disk.
    """

    def __init__(self, files: Sequence[Path]) -> None:
        self.boundary = f"emix-{secrets.token_hex(16)}"
        self._pieces: list[bytes | tuple[Path, int]] = []
        for path in files:
            size = path.stat().st_size
            head = (
                f"--{self.boundary}\r\nContent-Type: application/dicom\r\n"
                f"Content-Length: {size}\r\n\r\n"
            ).encode("ascii")
            self._pieces += [head, (path, size), b"\r\n"]
        self._pieces.append(f"--{self.boundary}--\r\n".encode("ascii"))
        self._length = sum(len(p) if isinstance(p, bytes) else p[1] for p in self._pieces)
        self._index = 0
        self._pending = b""
        self._file: BinaryIO | None = None
        self._left = 0

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="application/dicom"; boundary={self.boundary}'

    def __len__(self) -> int:
        return self._length

    def read(self, size: int = -1) -> bytes:
        """The next bytes of the body (at most ``size``, or 1 MiB when ``size`` < 0)."""
        want = size if size and size > 0 else 1024 * 1024
        out = bytearray()
        while len(out) < want:
            if self._pending:
                take = self._pending[: want - len(out)]
                self._pending = self._pending[len(take) :]
                out += take
                continue
            if self._file is not None:
                data = self._file.read(min(want - len(out), self._left))
                self._left -= len(data)
                if not data or self._left == 0:
                    if self._left:
                        raise InvalidInput("an instance file shrank while it was being sent")
                    self._file.close()
                    self._file = None
                out += data
                continue
            if self._index >= len(self._pieces):
                break
            piece = self._pieces[self._index]
            self._index += 1
            if isinstance(piece, bytes):
                self._pending = piece
            else:
                self._file = open(piece[0], "rb")  # noqa: SIM115 - closed when read to its end
                self._left = piece[1]
                if self._left == 0:
                    self._file.close()
                    self._file = None
        return bytes(out)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
