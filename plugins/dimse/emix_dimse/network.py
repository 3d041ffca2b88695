"""What pynetdicom needs to behave as emix wants, in one place.

* received datasets go to a file as their P-DATA fragments arrive (never a whole
  instance in memory) and are sent from files without being decoded;
  storage presentation contexts are accepted with the transfer syntax proposed;
  in an acceptor association, a C-STORE request's fragments are written to its file
  straight from the PDU and its response is encoded directly (:mod:`emix_dimse.fastpath`);
* no identifiers in pynetdicom's logs (they are PHI);
* a socket that refuses a PDU longer than the listener's limit before reading it
  (pynetdicom would read all of it into memory first), reads in large chunks, and
  sets TCP_NODELAY;
* while idle, the association's network thread waits on its socket (up to a
  millisecond) instead of sleeping a millisecond between checks, so a PDU is read the
  moment it arrives, and a response queued by the association wakes it at once; the
  association's own thread likewise waits on its message queue rather than sleeping:
  with several PDUs per instance, the sleeps cost more than the reading.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import weakref
from typing import Any

from pynetdicom import _config
from pynetdicom.transport import AssociationSocket, RequestHandler

from emix_dimse import fastpath

__all__ = ["configure_pynetdicom", "GuardedRequestHandler", "nodelay"]

#: Room above the negotiated maximum PDU length for PDU and item headers.
PDU_SLACK = 64 * 1024


def configure_pynetdicom() -> None:
    """Process-wide pynetdicom settings (idempotent)."""
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.STORE_SEND_CHUNKED_DATASET = True
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


def nodelay(sock: Any) -> None:
    with contextlib.suppress(OSError, AttributeError):  # not TCP, or already closed
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


#: Longest wait on the socket per turn of the network thread (it also sends what the
#: association queued, so it never blocks longer than this).
IDLE_WAIT = 0.001
#: Longest wait for a DIMSE message per turn of the association's thread (it also
#: checks for release and abort between waits).
MESSAGE_WAIT = 0.005


class GuardedSocket(AssociationSocket):
    """An association socket with a ceiling on the PDU length it will read, that waits
    for data instead of answering at once."""

    limit: int = 16 * 1024 * 1024
    #: bytes put back by :meth:`unread`
    pushback: bytes = b""
    #: readable when the association queued something to send (see :func:`_wake_on_send`)
    waker: socket.socket | None = None

    @property
    def ready(self) -> bool:
        """True when data can be read, waiting up to :data:`IDLE_WAIT` for some (less
        when the association has something to send)."""
        sock = self.socket
        if sock is None or self._is_connected is False:
            return False
        if self.pushback:
            return True
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True  # decrypted bytes select() does not see
        waiting = [sock] if self.waker is None else [sock, self.waker]
        try:
            readable, _, _ = select.select(waiting, [], [], IDLE_WAIT)
        except (OSError, TimeoutError, ValueError):
            self.event_queue.put("Evt17")  # transport connection closed
            return False
        if self.waker is not None and self.waker in readable:
            with contextlib.suppress(OSError):
                self.waker.recv(4096)
        return sock in readable

    def close(self) -> None:
        super().close()
        if self.waker is not None:
            self.waker.close()

    def unread(self, data: bytes | bytearray) -> None:
        """Put bytes back: the next :meth:`recv` returns them first (a PDU header the
        C-STORE shortcut looked at and left to pynetdicom)."""
        self.pushback = bytes(data) + self.pushback

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > self.limit:
            # pynetdicom turns this into "transport connection closed" (Evt17)
            raise OSError(f"PDU of {nr_bytes} bytes exceeds the limit of {self.limit}")
        buffer = bytearray(nr_bytes)
        got = self.recv_into(memoryview(buffer))
        return buffer if got == nr_bytes else buffer[:got]

    def recv_into(self, view: memoryview) -> int:
        """Fill ``view`` from the connection; fewer bytes only when it closed."""
        got = 0
        if self.pushback:
            got = min(len(self.pushback), len(view))
            view[:got] = self.pushback[:got]
            self.pushback = self.pushback[got:]
        sock = self.socket
        if sock is None:
            return got
        wanted = len(view)
        while got < wanted:
            count = sock.recv_into(view[got:], wanted - got)
            if not count:
                return got
            got += count
        return got


class GuardedRequestHandler(RequestHandler):
    """Creates each acceptor association with a :class:`GuardedSocket`."""

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        sock: Any = assoc.dul.socket
        sock.__class__ = GuardedSocket
        sock.limit = max(int(self.ae.maximum_pdu_size or 0), 16 * 1024) + PDU_SLACK
        nodelay(sock.socket)
        # the socket's wait paces the network thread (instead of a sleep per turn)
        assoc.dul._run_loop_delay = 0
        _wake_on_send(assoc.dul, sock)
        _wait_for_messages(assoc.dimse)
        fastpath.install(assoc.dul, sock, getattr(self.server, "incoming_folder", None))
        return assoc


def _wait_for_messages(dimse: Any) -> None:
    """The association's thread polls for messages (sleeping a millisecond between
    polls): let each poll wait for one instead, up to :data:`MESSAGE_WAIT`."""
    take = dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        if block:  # an operation waiting for its response: as pynetdicom does
            return take(block=True)
        try:
            return dimse.msg_queue.get(timeout=MESSAGE_WAIT)
        except queue.Empty:
            return None, None

    dimse.get_msg = get_msg


def _wake_on_send(dul: Any, sock: GuardedSocket) -> None:
    """Make what the association queues for sending wake the network thread's wait."""
    waker, bell = socket.socketpair()
    waker.setblocking(False)
    bell.setblocking(False)
    sock.waker = waker
    queue_pdu = dul.send_pdu

    def send_pdu(primitive: Any) -> None:
        queue_pdu(primitive)
        with contextlib.suppress(OSError):  # closed, or already rung enough
            bell.send(b"\0")

    dul.send_pdu = send_pdu
    weakref.finalize(dul, bell.close)
