"""An MLLP client: frame an HL7 v2 message, send it, wait for its acknowledgement.

MLLP (HL7 v2 Minimal Lower Layer Protocol) wraps each message as
``0x0B <message> 0x1C 0x0D``. The receiver answers with an ACK whose MSA-1 says
``AA`` (accepted), ``AE`` (error) or ``AR`` (rejected) — ``CA``/``CE``/``CR`` in
enhanced mode — and whose MSA-2 echoes the message's control ID (MSH-10).

Each attempt uses a connection of its own (many engines, and hl7apy's server, close
it after the ACK). A NAK, a timeout, a refused or dropped connection, or an ACK for
another message is retried with exponential backoff; the same bytes (same control
ID) are resent, so a receiver that already filed the first copy can recognise it.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from emix_core import EmixError

__all__ = ["END_BLOCK", "START_BLOCK", "Ack", "MllpClient", "MllpError", "frame", "parse_ack"]

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\r"
#: The largest acknowledgement accepted (an ACK is a few hundred bytes).
MAX_ACK_BYTES = 1024 * 1024
log = logging.getLogger(__name__)


class MllpError(EmixError):
    """The interface engine did not accept a message (after every retry)."""

    http_status = 502
    code = "mllp"


@dataclass(frozen=True)
class Ack:
    """An acknowledgement: MSA-1 (``AA``, ``AE``, ``AR``, ``CA``...) and MSA-2.

    ``text`` (MSA-3) is the receiver's own wording: it may name the patient, so it is
    kept for the caller but never logged or put in an error message.
    """

    code: str
    control_id: str
    text: str = ""

    @property
    def accepted(self) -> bool:
        return self.code in ("AA", "CA")


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
    """Read MSA-1, MSA-2 and MSA-3 from an acknowledgement (without the framing)."""
    text = payload.decode("utf-8", "replace").replace("\r\n", "\r").replace("\n", "\r")
    for segment in text.split("\r"):
        if segment.startswith("MSA|"):
            fields = segment.split("|") + ["", "", ""]
            return Ack(fields[1].strip().upper(), fields[2].strip(), fields[3])
    raise MllpError("the interface engine answered without an MSA segment")


class MllpClient:
    """Send HL7 v2 messages to one MLLP listener.

    :param host: the interface engine's host name or address.
    :param port: its MLLP port (2575 is customary).
    :param timeout: seconds to connect, and to wait for the ACK after sending.
    :param retries: attempts after the first (on NAK, timeout or connection failure).
    :param backoff: seconds before the first retry; doubles each time.
    :param max_backoff: longest wait between two attempts.
    :param tls: a TLS context to speak MLLP over TLS, or ``None`` for plain TCP.
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
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.retries = max(0, retries)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.tls = tls
        self.sleep = sleep
        self.attempts = 0  # attempts made by the last send()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def send(self, message: bytes) -> Ack:
        """Send one message until it is accepted.

        :return: the accepting acknowledgement (``AA`` or ``CA``).
        :raises MllpError: still not accepted after ``retries`` retries; the message
            names the last reason (a NAK code, a timeout), never the content.
        """
        framed = frame(message)
        expected = control_id(message)
        last = ""
        for attempt in range(1, self.retries + 2):
            self.attempts = attempt
            try:
                ack = self._exchange(framed)
            except TimeoutError:
                last = f"no acknowledgement within {self.timeout:g} s"
            except OSError as exc:
                last = f"connection failed ({exc.strerror or type(exc).__name__})"
            except MllpError as exc:
                last = exc.message
            else:
                if ack.control_id and expected and ack.control_id != expected:
                    last = "the acknowledgement was for another message (MSA-2)"
                elif ack.accepted:
                    return ack
                else:
                    last = f"negative acknowledgement {ack.code or '(empty MSA-1)'}"
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

    def _exchange(self, framed: bytes) -> Ack:
        deadline = time.monotonic() + self.timeout
        with socket.create_connection((self.host, self.port), timeout=self.timeout) as raw:
            conn: socket.socket = raw
            if self.tls is not None:
                conn = self.tls.wrap_socket(raw, server_hostname=self.host)
            conn.sendall(framed)
            return parse_ack(self._read_frame(conn, deadline))

    def _read_frame(self, conn: socket.socket, deadline: float) -> bytes:
        """Bytes between a start block and the next end block, within the deadline."""
        buffer = b""
        while True:
            start = buffer.find(START_BLOCK)
            end = buffer.find(END_BLOCK, start + 1) if start >= 0 else -1
            if end >= 0:
                return buffer[start + 1 : end]
            if len(buffer) > MAX_ACK_BYTES:
                raise MllpError("the interface engine's answer is not an MLLP-framed ACK")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            conn.settimeout(remaining)
            chunk = conn.recv(65536)
            if not chunk:
                raise MllpError("the interface engine closed the connection without an ACK")
            buffer += chunk
