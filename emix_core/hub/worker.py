"""gunicorn's threaded worker with bounded read times, so slow clients cannot starve it.

A thread of the ``gthread`` worker reads a request's headers to the end before anything
else; a client that sends one header line every few seconds keeps that thread forever,
and a few dozen such clients hold every thread (``/healthz`` stops answering). This
worker cuts such a connection once its headers took longer than ``header_timeout``
seconds, and a request body that stalls for ``body_idle_timeout`` seconds. A timed-out
connection is shut down, which frees its thread at once.

What it does not do: stop a client that opens connections faster than they are cut.
Facing the internet directly, put a buffering reverse proxy (nginx, HAProxy) in front,
with per-address connection limits; see docs/security.md.

A request body of known length also gets ``readinto``: the bytes go from the socket
straight into the application's buffer, where gunicorn's own reader copied each byte
several times through its read-ahead buffers (a 100 MB upload spent more time there
than in hashing and encrypting it).
"""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from typing import Any

from gunicorn.http.body import LengthReader
from gunicorn.http.unreader import SocketUnreader
from gunicorn.workers.gthread import ThreadWorker

#: Set by ``emix hub serve`` before the workers fork.
HEADER_TIMEOUT = 10.0
BODY_IDLE_TIMEOUT = 60.0


class BoundedThreadWorker(ThreadWorker):
    """``gthread`` with a deadline on reading headers and an idle limit on bodies."""

    def init_process(self) -> None:
        self._reading: dict[int, tuple[Any, float]] = {}
        self._reading_lock = threading.Lock()
        watchdog = threading.Thread(target=self._watch, name="emix-read-deadline", daemon=True)
        watchdog.start()
        super().init_process()

    def handle(self, conn: Any) -> Any:
        with self._reading_lock:
            self._reading[id(conn)] = (conn, time.monotonic() + HEADER_TIMEOUT)
        try:
            return super().handle(conn)
        finally:
            with self._reading_lock:
                self._reading.pop(id(conn), None)

    def handle_request(self, req: Any, conn: Any) -> Any:
        with self._reading_lock:  # headers are in: the deadline no longer applies
            self._reading.pop(id(conn), None)
        with contextlib.suppress(OSError):
            conn.sock.settimeout(BODY_IDLE_TIMEOUT)  # a stalled body read fails
        if SocketBody.fits(getattr(req, "body", None)):
            req.body = SocketBody(req.body)
        return super().handle_request(req, conn)

    def _watch(self) -> None:
        while True:
            time.sleep(0.5)
            now = time.monotonic()
            with self._reading_lock:
                late = [c for c, deadline in self._reading.values() if deadline < now]
                for conn in late:
                    self._reading.pop(id(conn), None)
            for conn in late:
                self.log.warning("closing a connection whose headers took too long")
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)


class SocketBody:
    """A request body of known length read straight from the socket into the caller's
    buffer (``readinto``), or through a small buffer of its own for small reads.

    Bytes gunicorn's body or reader already hold are handed out first. Whatever this
    body holds is given back to gunicorn's reader before any other way of reading
    (``readline``, reading to the end) is used, so they can be mixed; the ``failed``
    flag gunicorn checks before reusing the connection is set on any error.
    """

    #: reads smaller than this are served from one receive of up to this many bytes
    SMALL = 64 * 1024

    def __init__(self, body: Any) -> None:
        self._body = body
        self._reader: LengthReader = body.reader
        self._unreader: SocketUnreader = body.reader.unreader
        self._ahead = memoryview(bytearray(self.SMALL))
        self._start = self._end = 0

    @staticmethod
    def fits(body: Any) -> bool:
        """Whether ``body`` is gunicorn's body over a Content-Length reader on a socket."""
        reader = getattr(body, "reader", None)
        return (
            isinstance(reader, LengthReader)
            and isinstance(getattr(reader, "unreader", None), SocketUnreader)
            and hasattr(body, "buf")
            and hasattr(reader.unreader, "buf")
            and hasattr(reader.unreader, "sock")
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._body, name)

    def readinto(self, buffer: Any) -> int:
        """Read up to ``len(buffer)`` bytes of the body into ``buffer``; 0 at its end."""
        view = memoryview(buffer).cast("B")
        try:
            return self._readinto(view)
        except BaseException:
            self._body.failed = True
            raise

    def _readinto(self, view: memoryview) -> int:
        # what gunicorn read before comes first: its body's buffer, then its reader's
        if _held(self._body.buf):
            data = self._body.buf.getvalue()
            self._body.buf = io.BytesIO()
            self._body.buf.write(data[len(view) :])
            view[: min(len(view), len(data))] = data[: len(view)]
            return min(len(view), len(data))
        ahead = min(_held(self._unreader.buf), self._reader.length)
        if ahead:
            data = self._unreader.read(min(len(view), ahead))
            self._reader.length -= len(data)
            view[: len(data)] = data
            return len(data)
        if self._start == self._end:
            wanted = min(len(view), self._reader.length)
            if wanted <= 0:
                return 0
            if wanted >= self.SMALL:
                received = self._unreader.sock.recv_into(view[:wanted])
                self._reader.length -= received
                return received
            received = self._unreader.sock.recv_into(
                self._ahead[: min(self.SMALL, self._reader.length)]
            )
            self._reader.length -= received
            self._start, self._end = 0, received
            if not received:
                return 0
        count = min(len(view), self._end - self._start)
        view[:count] = self._ahead[self._start : self._start + count]
        self._start += count
        return count

    def read(self, size: int | None = -1) -> bytes:
        """``size`` bytes (fewer only at the end of the body); all the rest without size."""
        if size is None or size < 0:
            self._give_back()
            return bytes(self._body.read())
        # never more than the body still holds (a caller may ask for "a lot")
        size = min(size, self._reader.length + self._end - self._start + _held(self._body.buf))
        out = bytearray(size)
        view = memoryview(out)
        filled = 0
        while filled < size:
            got = self.readinto(view[filled:])
            if not got:
                break
            filled += got
        del view
        del out[filled:]
        return bytes(out)

    def readline(self, size: int | None = None) -> bytes:
        self._give_back()
        return bytes(self._body.readline(size))

    def readlines(self, size: int | None = None) -> list[bytes]:
        self._give_back()
        return list(self._body.readlines(size))

    def __iter__(self) -> Any:
        self._give_back()
        return iter(self._body)

    def _give_back(self) -> None:
        """Return what this body holds to gunicorn's reader, in order."""
        if self._start < self._end:
            self._unreader.unread(bytes(self._ahead[self._start : self._end]))
            self._reader.length += self._end - self._start
            self._start = self._end = 0


def _held(buffer: Any) -> int:
    """Bytes held in one of gunicorn's BytesIO buffers (written up to its position)."""
    return int(buffer.tell())
