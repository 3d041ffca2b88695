"""The C-STORE data path of the listener, without pynetdicom's per-fragment objects.

pynetdicom decodes every P-DATA-TF PDU into PDU, item and primitive objects, copying the
data three times before its storage handler writes it to a file, and builds each
C-STORE response as a pydicom data set it then encodes. For a 0.5 MB instance that is
more time than the rest of the listener's work. Per association, two narrow shortcuts:

* **a C-STORE request's file is opened directly.** A P-DATA-TF PDU that opens a
  C-STORE request (its whole command set, perhaps the first data set fragments) is read
  into one reusable buffer; the command set is decoded by pynetdicom, the file is
  created in the listener's spool folder (not in the temporary folder, so keeping it
  is a rename) and begins with the File Meta Information pynetdicom would write, byte
  for byte, encoded directly instead of through two pydicom data sets.
* **data set fragments go straight to that file.** A PDU holding only data set
  fragments of the request being received is read into the same buffer and its
  fragments written to the file as they are. The last fragment is handed to pynetdicom
  as an empty final fragment, so the request is completed by pynetdicom itself. The
  bytes written are the bytes received.
* **the C-STORE response is encoded directly** (the command set of PS3.7 9.3.1.2 with
  the statuses the listener gives), and queued as one P-DATA as pynetdicom would.

Anything else — another PDU type, another DIMSE message, another presentation context,
a malformed item, a handler bound to the low-level PDU or DIMSE events, an error
comment in a response — takes pynetdicom's own path unchanged, so its state machine,
checks and errors still apply. A command fragment in the middle of a data set is an
invalid PDU (the association is aborted). The file of a data set that never completes
is removed when its association ends (:func:`discard_incomplete`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import struct
import tempfile
from io import BytesIO
from pathlib import Path
from typing import Any

from pynetdicom import (
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    _config,
    evt,
)
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode
from pynetdicom.pdu_primitives import P_DATA

__all__ = ["install", "encode_store_response", "encode_file_meta", "discard_incomplete"]

P_DATA_TF = 0x04
#: events whose handlers must see every PDU or DIMSE message: none are bound by emix
_PDU_EVENTS = (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV)
_DIMSE_SENT = (evt.EVT_DIMSE_SENT, evt.EVT_DATA_SENT, evt.EVT_PDU_SENT)

_ITEM = struct.Struct(">LBB")  # item length, presentation context ID, control header
_HEADER = struct.Struct(">BBL")  # PDU type, reserved, PDU length


def install(dul: Any, sock: Any, folder: Path | None = None) -> None:
    """Give one acceptor association the direct data set and response paths.

    :param dul: the association's DUL service provider.
    :param sock: its :class:`~emix_dimse.network.GuardedSocket` (for the pushback of
        a PDU header the shortcut does not take).
    :param folder: where received data sets are written (the temporary folder when
        none): a spool's own folder, so that keeping one is a rename.
    """
    assoc = dul.assoc
    if any(assoc.get_handlers(event) for event in _PDU_EVENTS):
        return
    read_normally = dul._read_pdu_data
    buffer = bytearray(sock.limit)
    view = memoryview(buffer)
    where = Path(folder or tempfile.gettempdir())

    def read_pdu_data() -> None:
        message = assoc.dimse.message
        streaming = isinstance(message, C_STORE_RQ) and message._data_set_file is not None
        if not (
            (streaming or message is None)
            and _config.STORE_RECV_CHUNKED_DATASET
            and dul.state_machine.current_state == "Sta6"
            and dul.event_queue.empty()
        ):
            read_normally()
            return
        try:
            header = sock.recv(6)
        except (OSError, TimeoutError):
            dul.event_queue.put("Evt17")  # transport connection closed
            return
        if len(header) != 6 or header[0] != P_DATA_TF:
            sock.unread(header)  # pynetdicom reads it again, and judges it
            read_normally()
            return
        _, _, length = _HEADER.unpack(header)
        if length + 6 > len(buffer):
            sock.unread(header)  # over the limit: refused by the socket as usual
            read_normally()
            return
        buffer[:6] = header
        try:
            got = sock.recv_into(view[6 : 6 + length])
        except (OSError, TimeoutError):
            got = -1
        if got != length:
            dul.event_queue.put("Evt17")  # closed before the entire PDU was received
            return
        if streaming:
            _store_fragments(dul, message, view, 6 + length)
        else:
            _open_store(dul, view, 6 + length, where)

    def send_msg(primitive: Any, context_id: int) -> None:
        encoded = None
        if type(primitive) is C_STORE and not any(assoc.get_handlers(e) for e in _DIMSE_SENT):
            encoded = encode_store_response(primitive)
        limit = assoc.dimse.maximum_pdu_size
        if encoded is None or (limit and len(encoded) > limit - 6):
            send_normally(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list = [[context_id, b"\x03" + encoded]]  # type: ignore[list-item]
        dul.send_pdu(pdata)

    send_normally = assoc.dimse.send_msg
    dul._read_pdu_data = read_pdu_data
    assoc.dimse.send_msg = send_msg


def _items(view: memoryview, end: int) -> list[tuple[int, int, int, int]] | None:
    """The presentation data value items of a P-DATA-TF PDU: (context ID, control
    header, start and end of the fragment); ``None`` when malformed, empty, or when an
    item follows a last fragment (pynetdicom would ignore it)."""
    items: list[tuple[int, int, int, int]] = []
    offset = 6
    while offset < end:
        if offset + 6 > end or (items and items[-1][1] & 2):
            return None
        length, context_id, control = _ITEM.unpack_from(view, offset)
        stop = offset + 4 + length
        if length < 2 or stop > end:
            return None
        items.append((context_id, control, offset + 6, stop))
        offset = stop
    return items or None


def _open_store(dul: Any, view: memoryview, end: int, folder: Path) -> None:
    """A PDU with no message being received: when it opens a C-STORE request (its
    whole command set, then perhaps data set fragments), create the request's file;
    anything else goes to pynetdicom."""
    items = _items(view, end)
    commands = 0
    while items and commands < len(items) and items[commands][1] & 1:
        commands += 1
    if not items or not commands or not items[commands - 1][1] & 2:
        return _decode_normally(dul, view, end)
    context_id = items[0][0]
    if any(cx != context_id or (c & 1 and i >= commands) for i, (cx, c, _, _) in enumerate(items)):
        return _decode_normally(dul, view, end)
    encoded = b"".join(view[start:stop] for _, _, start, stop in items[:commands])
    try:
        command_set = decode(BytesIO(encoded), True, True)
        is_store = command_set.CommandField == 0x0001 and command_set.CommandDataSetType != 0x0101
        meta = encode_file_meta(
            command_set.AffectedSOPClassUID,
            command_set.AffectedSOPInstanceUID,
            dul.assoc._accepted_cx[context_id].transfer_syntax[0],
        )
    except Exception:  # not a C-STORE request pynetdicom takes as it is: its own path
        meta = None
    if meta is None or not is_store:
        return _decode_normally(dul, view, end)
    path = folder / f"{secrets.token_hex(16)}.dcm"
    try:
        file = _ReceivedFile(path)
    except OSError:
        return _decode_normally(dul, view, end)  # pynetdicom tries its temporary folder
    try:
        file.write(meta)
    except OSError:
        file.discard()
        return _decode_normally(dul, view, end)
    message = DIMSEMessage()
    message.__class__ = C_STORE_RQ
    message.context_id = context_id
    message.encoded_command_set = BytesIO(encoded)
    message.command_set = command_set
    message._data_set_path = path
    message._data_set_file = file  # type: ignore[assignment]
    dul.assoc.dimse.message = message
    if commands < len(items):
        _write(dul, message, view, items[commands:])


def _store_fragments(dul: Any, message: Any, view: memoryview, end: int) -> None:
    """Write the data set fragments of one P-DATA-TF PDU (``view[:end]``) to the
    request's file; a PDU holding anything else goes to pynetdicom."""
    items = _items(view, end)
    if items is not None and any(c & 1 for _, c, _, _ in items):
        # a message's fragments are never interleaved (PS3.8 E.2): invalid PDU, abort
        dul.event_queue.put("Evt19")
        return
    if items is None or any(cx != message.context_id for cx, _, _, _ in items):
        return _decode_normally(dul, view, end)
    _write(dul, message, view, items)


def _write(dul: Any, message: Any, view: memoryview, items: list[tuple[int, int, int, int]]):
    """Data set fragments to the request's file; after the last one the request is
    completed by pynetdicom (an empty final fragment)."""
    file = message._data_set_file.file
    try:
        for _, _, start, stop in items:
            file.write(view[start:stop])
    except (OSError, ValueError):  # disk refused, or file closed by an abort meanwhile
        dul.event_queue.put("Evt17")  # the association ends, as when pynetdicom's fails
        return
    if items[-1][1] & 2:
        final = P_DATA()
        final.presentation_data_value_list = [[message.context_id, b"\x02"]]  # type: ignore[list-item]
        dul.assoc.dimse.receive_primitive(final)


def _decode_normally(dul: Any, view: memoryview, end: int) -> None:
    """What pynetdicom does with a PDU it read: decode it and queue its event."""
    try:
        pdu, event = dul._decode_pdu(bytearray(view[:end]))
    except Exception:
        dul.event_queue.put("Evt19")  # unrecognised or invalid PDU
        return
    dul.event_queue.put(event)
    dul._recv_pdu.put(pdu)


class _ReceivedFile:
    """A received data set's file, as pynetdicom uses its temporary file (``name``,
    ``file``, ``write``, ``close``)."""

    def __init__(self, path: Path) -> None:
        self.name = str(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.file = os.fdopen(fd, "wb")

    def write(self, data: Any) -> int:
        return self.file.write(data)

    def close(self) -> None:
        self.file.close()

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            os.unlink(self.name)


def discard_incomplete(assoc: Any) -> None:
    """Remove the file of a C-STORE request the association did not finish (aborted,
    or the connection lost mid data set); pynetdicom leaves it."""
    message: Any = getattr(assoc.dimse, "message", None)
    file = getattr(message, "_data_set_file", None)
    if file is None:
        return
    with contextlib.suppress(OSError):
        file.close()
    with contextlib.suppress(OSError):
        os.unlink(file.name)
    message._data_set_file = None


def _explicit(tag: int, vr: bytes, value: bytes) -> bytes:
    """A group 0002 element, Explicit VR Little Endian."""
    if vr == b"OB":
        return struct.pack("<HH2sHL", 2, tag, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 2, tag, vr, len(value)) + value


def encode_file_meta(sop_class: Any, sop_instance: Any, transfer_syntax: Any) -> bytes | None:
    """Preamble, ``DICM`` and the File Meta Information pynetdicom writes before a
    received data set, byte for byte (``None`` for values it would not write as they
    are: missing, not ASCII, too long)."""
    values = [str(v) if v is not None else "" for v in (sop_class, sop_instance, transfer_syntax)]
    if not all(0 < len(v) <= 64 and v.isascii() and v.isprintable() for v in values):
        return None
    version = str(PYNETDICOM_IMPLEMENTATION_VERSION).encode("ascii")
    body = b"".join(
        (
            _explicit(0x0001, b"OB", b"\x00\x01"),
            _explicit(0x0002, b"UI", _uid(values[0])),
            _explicit(0x0003, b"UI", _uid(values[1])),
            _explicit(0x0010, b"UI", _uid(values[2])),
            _explicit(0x0012, b"UI", _uid(PYNETDICOM_IMPLEMENTATION_UID)),
            _explicit(0x0013, b"SH", version + b" " * (len(version) % 2)),
        )
    )
    return b"\0" * 128 + b"DICM" + _explicit(0x0000, b"UL", struct.pack("<L", len(body))) + body


def _element(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0, tag, len(value)) + value


def _uid(value: Any) -> bytes:
    raw = str(value).encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def encode_store_response(rsp: Any) -> bytes | None:
    """The C-STORE-RSP command set (Implicit VR Little Endian, PS3.7 9.3.1.2), byte for
    byte as pynetdicom encodes it; ``None`` when it carries more than a status (an
    error comment or offending element: pynetdicom encodes those)."""
    if rsp.ErrorComment is not None or rsp.OffendingElement is not None:
        return None
    sop_class, sop_instance = rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID
    message_id, status = rsp.MessageIDBeingRespondedTo, rsp.Status
    if None in (sop_class, sop_instance, message_id, status):
        return None
    with contextlib.suppress(UnicodeEncodeError, struct.error):
        body = b"".join(
            (
                _element(0x0002, _uid(sop_class)),
                _element(0x0100, struct.pack("<H", 0x8001)),
                _element(0x0120, struct.pack("<H", message_id)),
                _element(0x0800, struct.pack("<H", 0x0101)),
                _element(0x0900, struct.pack("<H", status)),
                _element(0x1000, _uid(sop_instance)),
            )
        )
        return _element(0x0000, struct.pack("<L", len(body))) + body
    return None
