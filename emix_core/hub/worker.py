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
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any

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
