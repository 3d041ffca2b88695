"""An MLLP client: frame an HL7 v2 message, send it, wait for its acknowledgement.

MLLP (HL7 v2 Minimal Lower Layer Protocol) wraps each message as
``0x0B <message> 0x1C 0x0D``. The receiver answers with an ACK whose MSA-1 says
``AA`` (accepted), ``AE`` (error) or ``AR`` (rejected) — ``CA``/``CE``/``CR`` in
enhanced mode — and whose MSA-2 echoes the message's control ID (MSH-10).

Each attempt uses a connection of its own (many engines, and hl7apy's server, close
it after the ACK). What happens next depends on the answer:

- ``AA`` (or ``CA`` in original mode): accepted.
- ``AR`` or ``CR``: rejected. Final: the same bytes would be rejected again, so the
  message is not resent (:class:`MllpRejected`).
- ``AE``, ``CE``, a timeout, a refused or dropped connection, or an ACK for another
  message: retried with exponential backoff; the same bytes (same control ID) are
  resent, so a receiver that already filed the first copy can recognise it.
- ``CA`` in enhanced mode: the engine has committed the message to safe storage; its
  application acknowledgement follows on the same connection and decides as above
  (it is acknowledged in turn with a ``CA`` when it asks for one). Should none come
  within ``application_ack_timeout``, the message stays committed: the engine owns
  it, and it is not resent.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from emix_core import EmixError

__all__ = [
    "END_BLOCK",
    "START_BLOCK",
    "Ack",
    "Delivery",
    "MllpClient",
    "MllpError",
    "MllpRejected",
    "frame",
    "parse_ack",
]

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\r"
#: The largest acknowledgement accepted (an ACK is a few hundred bytes).
MAX_ACK_BYTES = 1024 * 1024
log = logging.getLogger(__name__)


class MllpError(EmixError):
    """The interface engine did not accept a message (after every retry)."""

    http_status = 502
    code = "mllp"


class MllpRejected(MllpError):
    """The interface engine rejected a message (``AR``/``CR``): final, never resent."""

    http_status = 422
    code = "mllp_rejected"

    def __init__(self, message: str, delivery: Delivery) -> None:
        super().__init__(message)
        self.delivery = delivery


@dataclass(frozen=True)
class Ack:
    """An acknowledgement: MSA-1 (``AA``, ``AE``, ``AR``, ``CA``...) and MSA-2.

    ``text`` (MSA-3) is the receiver's own wording: it may name the patient, so it is
    kept for the caller but never logged or put in an error message. ``wants_ack``:
    the ACK itself asks to be acknowledged (its MSH-15 is ``AL``), as an enhanced-mode
    application acknowledgement may; ``message_control_id`` is its own MSH-10.
    """

    code: str
    control_id: str
    text: str = ""
    wants_ack: bool = False
    message_control_id: str = ""

    @property
    def accepted(self) -> bool:
        return self.code in ("AA", "CA")

    @property
    def rejected(self) -> bool:
        return self.code in ("AR", "CR")


@dataclass(frozen=True)
class Delivery:
    """What became of one message.

    :param outcome: ``accepted`` (application ACK ``AA``, or ``CA`` in original mode),
        ``committed`` (enhanced mode: ``CA``, no application ACK in time), or
        ``rejected`` (``AR``/``CR``).
    :param ack: the acknowledgement that decided it.
    :param commit: the commit ACK (``CA``) that preceded it, in enhanced mode.
    :param attempts: how many times the message was sent.
    """

    outcome: str
    control_id: str
    ack: Ack
    attempts: int
    commit: Ack | None = None


def frame(message: bytes) -> bytes:
    """Wrap a message in MLLP's start and end blocks."""
    if START_BLOCK in message or b"\x1c" in message:
        raise MllpError("an HL7 message holds an MLLP framing byte (0x0B or 0x1C)")
    return START_BLOCK + message + END_BLOCK


def control_id(message: bytes) -> str:
    """MSH-10 of a message (its control ID)."""
    msh = message.split(b"\r", 1)[0].decode("utf-8", "replace")
    fields = msh.split("|")
    return fields[9] if len(fields) > 9 else ""


def parse_ack(payload: bytes) -> Ack:
    """Read MSA-1, MSA-2 and MSA-3 (and MSH-10, MSH-15) from an acknowledgement."""
    text = payload.decode("utf-8", "replace").replace("\r\n", "\r").replace("\n", "\r")
    header: list[str] = []
    for segment in text.split("\r"):
        if segment.startswith("MSH|"):
            header = segment.split("|")
        if segment.startswith("MSA|"):
            fields = segment.split("|") + ["", "", ""]
            header += [""] * max(0, 15 - len(header))
            return Ack(
                fields[1].strip().upper(),
                fields[2].strip(),
                fields[3],
                wants_ack=header[14].strip().upper() == "AL",
                message_control_id=header[9].strip(),
            )
    raise MllpError("the interface engine answered without an MSA segment")


def commit_accept(ack: Ack) -> bytes:
    """The ``CA`` emix answers an application ACK with, when that ACK asks for one."""
    stamp = time.strftime("%Y%m%d%H%M%S")
    return (
        f"MSH|^~\\&|EMIX||||{stamp}||ACK^R01^ACK|{ack.message_control_id[:16]}CA|P|2.5.1\r"
        f"MSA|CA|{ack.message_control_id}\r"
    ).encode()


class _Reader:
    """Frames from one connection, keeping what arrived after the last one."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buffer = b""

    def frame(self, deadline: float) -> bytes:
        """Bytes between a start block and the next end block, within the deadline."""
        while True:
            start = self.buffer.find(START_BLOCK)
            end = self.buffer.find(END_BLOCK, start + 1) if start >= 0 else -1
            if end >= 0:
                payload = self.buffer[start + 1 : end]
                self.buffer = self.buffer[end + len(END_BLOCK) :]
                return payload
            if len(self.buffer) > MAX_ACK_BYTES:
                raise MllpError("the interface engine's answer is not an MLLP-framed ACK")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.conn.settimeout(remaining)
            chunk = self.conn.recv(65536)
            if not chunk:
                raise ConnectionClosed
            self.buffer += chunk


class ConnectionClosed(MllpError):
    """The engine closed the connection before it answered."""

    def __init__(self) -> None:
        super().__init__("the interface engine closed the connection without an ACK")


class MllpClient:
    """Send HL7 v2 messages to one MLLP listener.

    :param host: the interface engine's host name or address.
    :param port: its MLLP port (2575 is customary).
    :param timeout: seconds to connect, and to wait for the ACK after sending.
    :param retries: attempts after the first (on NAK, timeout or connection failure).
    :param backoff: seconds before the first retry; doubles each time.
    :param max_backoff: longest wait between two attempts.
    :param tls: a TLS context to speak MLLP over TLS, or ``None`` for plain TCP.
    :param enhanced: the engine uses enhanced acknowledgement mode: after a ``CA``,
        wait for the application acknowledgement.
    :param application_ack_timeout: seconds to wait for it after the ``CA``.
    :param sleep: how to wait between attempts (tests may pass a faster clock).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        tls: ssl.SSLContext | None = None,
        enhanced: bool = False,
        application_ack_timeout: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.retries = max(0, retries)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.tls = tls
        self.enhanced = enhanced
        self.application_ack_timeout = application_ack_timeout
        self.sleep = sleep
        self.attempts = 0  # attempts made by the last send()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def send(self, message: bytes) -> Ack:
        """Send one message until it is accepted; the deciding acknowledgement.

        :raises MllpRejected: the engine rejected it (final).
        :raises MllpError: still not accepted after ``retries`` retries.
        """
        return self.deliver(message).ack

    def deliver(self, message: bytes) -> Delivery:
        """Send one message until the engine accepts, commits or rejects it.

        :return: the accepting (``accepted``) or committing (``committed``) delivery.
        :raises MllpRejected: ``AR``/``CR``: not retried; ``.delivery`` tells more.
        :raises MllpError: still not accepted after ``retries`` retries; the message
            names the last reason (a NAK code, a timeout), never the content.
        """
        framed = frame(message)
        expected = control_id(message)
        last = ""
        for attempt in range(1, self.retries + 2):
            self.attempts = attempt
            try:
                delivery = self._exchange(framed, expected, attempt)
            except TimeoutError:
                last = f"no acknowledgement within {self.timeout:g} s"
            except MllpRejected:
                raise
            except MllpError as exc:
                last = exc.message
            except OSError as exc:
                last = f"connection failed ({exc.strerror or type(exc).__name__})"
            else:
                if delivery.ack.control_id and expected and delivery.ack.control_id != expected:
                    last = "the acknowledgement was for another message (MSA-2)"
                elif delivery.ack.rejected:
                    raise MllpRejected(
                        f"the interface engine at {self.address} rejected the report "
                        f"({delivery.ack.code}); it is not sent again: ask the engine's "
                        "team why (its answer is kept in the delivery report)",
                        delivery,
                    )
                elif delivery.outcome in ("accepted", "committed"):
                    return delivery
                else:
                    last = f"negative acknowledgement {delivery.ack.code or '(empty MSA-1)'}"
            log.warning(
                "mllp.attempt_failed",
                extra={"emix": {"address": self.address, "attempt": attempt, "reason": last}},
            )
            if attempt <= self.retries:
                self.sleep(self._delay(attempt))
        raise MllpError(
            f"the interface engine at {self.address} did not accept the report after "
            f"{self.retries + 1} attempts: {last}; it will be retried later"
        )

    def _delay(self, attempt: int) -> float:
        return min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.8, 1)

    def _exchange(self, framed: bytes, expected: str, attempt: int) -> Delivery:
        deadline = time.monotonic() + self.timeout
        with socket.create_connection((self.host, self.port), timeout=self.timeout) as raw:
            conn: socket.socket = raw
            if self.tls is not None:
                conn = self.tls.wrap_socket(raw, server_hostname=self.host)
            conn.sendall(framed)
            reader = _Reader(conn)
            ack = parse_ack(reader.frame(deadline))
            if ack.code != "CA" or not self.enhanced or ack.control_id not in ("", expected):
                return Delivery(_outcome(ack), expected, ack, attempt)
            return self._application_ack(conn, reader, ack, expected, attempt)

    def _application_ack(
        self, conn: socket.socket, reader: _Reader, commit: Ack, expected: str, attempt: int
    ) -> Delivery:
        """After a ``CA``: the application ACK, or ``committed`` if none comes in time."""
        deadline = time.monotonic() + self.application_ack_timeout
        try:
            ack = parse_ack(reader.frame(deadline))
        except (TimeoutError, ConnectionClosed, OSError):
            return Delivery("committed", expected, commit, attempt, commit)
        if ack.wants_ack:  # if this fails, the engine sends it again: what it said stands
            with contextlib.suppress(OSError):
                conn.sendall(frame(commit_accept(ack)))
        return Delivery(_outcome(ack), expected, ack, attempt, commit)


def _outcome(ack: Ack) -> str:
    if ack.rejected:
        return "rejected"
    return "accepted" if ack.accepted else "error"
