"""The forwarder: a disk queue of syslog messages and the thread that empties it over TLS.

Messages are RFC 5424 syslog messages carrying one DICOM PS3.15 A.5 audit message each,
framed by octet counting over TLS (RFC 5425), as IHE ATNA (ITI-20) asks. Every message is
written to an SQLite queue in the home first; a background thread sends them in order and
removes each once the TLS layer took it. While the repository is down they wait on disk,
across restarts of the process.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from emix_atna.settings import AtnaSettings
from emix_core import AuditEvent, event_row, to_dicom_audit_messages

__all__ = ["Forwarder", "DiskQueue", "syslog_message", "frame"]

log = logging.getLogger("emix.atna")

#: PRI of an audit message: facility 10 (security/authorization), severity 5 (notice).
_PRI_NORMAL = 10 * 8 + 5
#: Failures are warnings (severity 4).
_PRI_FAILURE = 10 * 8 + 4
_MSGID = "IHE+RFC-3881"
_BOM = b"\xef\xbb\xbf"


def _header_field(value: str, limit: int) -> str:
    """An RFC 5424 header field: printable US-ASCII without spaces, ``-`` when empty."""
    clean = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return clean or "-"


def syslog_message(
    xml: str, *, time_text: str, outcome: int, hostname: str, app_name: str
) -> bytes:
    """One RFC 5424 message: header, no structured data, a BOM and the UTF-8 XML."""
    pri = _PRI_NORMAL if outcome == 0 else _PRI_FAILURE
    stamp = time_text if time_text.endswith("Z") else "-"
    header = (
        f"<{pri}>1 {stamp} {_header_field(hostname, 255)} {_header_field(app_name, 48)} "
        f"{os.getpid()} {_MSGID} - "
    )
    body = xml.encode("utf-8")
    if body.startswith(b"<?xml"):  # ITI-20 carries the element, not a document prolog
        body = body[body.index(b"?>") + 2 :].lstrip()
    return header.encode("ascii") + _BOM + body


def frame(message: bytes) -> bytes:
    """RFC 5425 octet counting: ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(message)).encode("ascii") + b" " + message


class DiskQueue:
    """Messages waiting for the repository, in order, in an SQLite file of the home."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.touch(mode=0o600, exist_ok=True)  # it holds PHI: the owner's only
        with self._connect() as db:
            db.execute("pragma journal_mode=wal")
            db.execute(
                "create table if not exists outbox "
                "(seq integer primary key autoincrement, message blob not null)"
            )

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            yield db
        finally:
            db.close()

    def put(self, messages: list[bytes]) -> None:
        with self._connect() as db:
            db.execute("begin immediate")
            db.executemany("insert into outbox (message) values (?)", [(m,) for m in messages])
            db.execute("commit")

    def head(self, limit: int = 100) -> list[tuple[int, bytes]]:
        with self._connect() as db:
            rows = db.execute(
                "select seq, message from outbox order by seq limit ?", (limit,)
            ).fetchall()
        return [(int(seq), bytes(message)) for seq, message in rows]

    def remove(self, seq: int) -> None:
        with self._connect() as db:
            db.execute("delete from outbox where seq = ?", (seq,))

    def __len__(self) -> int:
        with self._connect() as db:
            return int(db.execute("select count(*) from outbox").fetchone()[0])


class _Connection:
    """One TLS connection to the repository, checked before each use."""

    def __init__(self, settings: AtnaSettings) -> None:
        self.settings = settings
        self.sock: ssl.SSLSocket | None = None
        context = ssl.create_default_context(cafile=settings.ca_bundle or None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if settings.client_cert:
            context.load_cert_chain(settings.client_cert, settings.client_key)
        self.context = context

    def _alive(self) -> bool:
        """A syslog receiver never writes: anything readable is its close or an alert."""
        sock = self.sock
        if sock is None:
            return False
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return True
        sock.setblocking(False)
        try:
            data = sock.recv(1)
        except ssl.SSLWantReadError:  # only TLS records (e.g. session tickets)
            return True
        except (OSError, ssl.SSLError):
            return False
        finally:
            with contextlib.suppress(OSError):
                sock.setblocking(True)
                sock.settimeout(self.settings.timeout_seconds)
        return bool(data)

    def send(self, data: bytes) -> None:
        if not self._alive():
            self.close()
            raw = socket.create_connection(
                (self.settings.host, self.settings.port), timeout=self.settings.timeout_seconds
            )
            try:
                self.sock = self.context.wrap_socket(raw, server_hostname=self.settings.host)
            except BaseException:
                raw.close()
                raise
            self._await_verdict()
        assert self.sock is not None
        self.sock.sendall(data)

    def _await_verdict(self) -> None:
        """Wait briefly for the repository to refuse us before sending anything.

        With TLS 1.3 the client's handshake ends before the server has checked the client
        certificate: a refused certificate shows only as an alert afterwards, and data
        sent meanwhile would be taken by the kernel and lost.
        """
        assert self.sock is not None
        self.sock.settimeout(self.settings.handshake_wait_seconds)
        try:
            data = self.sock.recv(1)
        except (TimeoutError, ssl.SSLWantReadError):
            data = None  # silence: accepted
        except (OSError, ssl.SSLError):
            self.close()
            raise
        finally:
            if self.sock is not None:
                self.sock.settimeout(self.settings.timeout_seconds)
        if data is not None:
            self.close()
            raise ConnectionResetError("the audit record repository closed the connection")

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None


class Forwarder:
    """Queues a home's audit events as syslog messages and sends them in the background."""

    def __init__(self, settings: AtnaSettings) -> None:
        self.settings = settings
        self.queue = DiskQueue(settings.queue_path)
        self._lock_path = settings.queue_path.with_suffix(".lock")
        self._connection = _Connection(settings)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="emix-atna", daemon=True)
        self._thread.start()
        self.last_error = ""

    def record(self, event: AuditEvent) -> int:
        """Queue one event (one message per patient); return how many messages."""
        row = event_row(event)
        messages = [
            syslog_message(
                xml,
                time_text=row["time"],
                outcome=row["outcome"],
                hostname=self.settings.audit_source_id,
                app_name=self.settings.app_name,
            )
            for xml in to_dicom_audit_messages(
                row,
                audit_source_id=self.settings.audit_source_id,
                enterprise_site_id=self.settings.enterprise_site_id,
            )
        ]
        self.queue.put(messages)
        self._wake.set()
        return len(messages)

    def drain(self) -> bool:
        """Send everything queued, in order; ``True`` when the queue is empty.

        One process sends at a time (a lock file beside the queue), so two processes of
        one home never send a message twice.
        """
        with open(self._lock_path, "a+b") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            while True:
                batch = self.queue.head()
                if not batch:
                    self.last_error = ""
                    return True
                for seq, message in batch:
                    try:
                        self._connection.send(frame(message))
                    except (OSError, ssl.SSLError) as exc:
                        self._connection.close()
                        self._note_failure(exc)
                        return False
                    self.queue.remove(seq)

    def _note_failure(self, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}"
        if error != self.last_error:  # once per kind of failure, not every retry
            log.warning(
                "audit record repository %s:%s unreachable (%s); %d messages queued",
                self.settings.host,
                self.settings.port,
                error,
                len(self.queue),
            )
        self.last_error = error

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                done = self.drain()
            except Exception:  # never let the thread die; the queue keeps the messages
                log.exception("ATNA forwarder failed; messages stay queued")
                done = False
            self._wake.wait(None if done else self.settings.retry_seconds)
            self._wake.clear()

    def flush(self, timeout: float) -> bool:
        """Try for at most ``timeout`` seconds to empty the queue (at exit, in tests)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.drain() and not len(self.queue):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(0.2, max(deadline - time.monotonic(), 0)))

    def close(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout=self.settings.timeout_seconds + 1)
        self._connection.close()

    def status(self) -> dict[str, Any]:
        return {
            "repository": self.settings.url,
            "audit_source_id": self.settings.audit_source_id,
            "queued": len(self.queue),
            "last_error": self.last_error,
        }
