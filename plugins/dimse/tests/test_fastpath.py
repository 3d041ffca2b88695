"""The listener's direct C-STORE path: what it encodes is what pynetdicom would encode,
and however an SCU cuts a C-STORE into PDUs, the data set arrives byte for byte; what
the shortcut does not take goes through pynetdicom, and an unfinished data set leaves
no file behind."""

from __future__ import annotations

import io
import struct
import time
from pathlib import Path

import pydicom
import pytest
from emix_dimse.fastpath import encode_file_meta, encode_store_response
from pydicom.data import get_testdata_file
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from plugins.dimse.tests.helpers import DCMTK, dataset_bytes, storescu, wait_for

#: A 64-character UID (the longest allowed); fixed, so parallel test workers agree.
LONG_UID = "1.2.826.0.1.3680043.8.498.58072808590756079479317178911264621278"

CT = Path(get_testdata_file("CT_small.dcm"))
EXPLICIT_LE = "1.2.840.10008.1.2.1"


# ---------------------------------------------------------------------- encodings
@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xA900, 0xC000, 0xC001, 0xB007])
@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "message_id"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", 1),  # odd length UIDs
        ("1.2.840.10008.5.1.4.1.1.4", "1.2.826.0.1.3680043.8.498.12", 65535),  # even
        ("1.2.840.10008.5.1.4.1.1.7", LONG_UID, 4242),
    ],
)
def test_store_response_is_what_pynetdicom_encodes(sop_class, sop_instance, message_id, status):
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    assert encode_store_response(rsp) == encode(message.command_set, True, True)


def test_a_response_with_an_error_comment_is_left_to_pynetdicom():
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    rsp.AffectedSOPInstanceUID = "1.2.3"
    rsp.Status = 0xC000
    rsp.ErrorComment = "cannot understand"
    assert encode_store_response(rsp) is None


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "syntax"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", "1.2.840.10008.1.2.1"),
        ("1.2.840.10008.5.1.4.1.1.4", "1.2.826.0.1.3680043.8.498.12", "1.2.840.10008.1.2.4.50"),
        ("1.2.840.10008.5.1.4.1.1.7", LONG_UID, "1.2.840.10008.1.2"),
    ],
)
def test_file_meta_is_what_pynetdicom_writes(sop_class, sop_instance, syntax):
    expected = io.BytesIO()
    expected.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(
        expected,  # type: ignore[arg-type]
        create_file_meta(
            sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=syntax
        ),
    )
    assert encode_file_meta(sop_class, sop_instance, syntax) == expected.getvalue()


@pytest.mark.parametrize("sop_instance", ["", "1.2." + "3" * 70, "1.2.\u00e9", "1.2\n3", None])
def test_file_meta_of_odd_values_is_left_to_pynetdicom(sop_instance):
    assert encode_file_meta("1.2.840.10008.5.1.4.1.1.2", sop_instance, EXPLICIT_LE) is None


# ---------------------------------------------------------------------- on the wire
def pdu(*items: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF PDU of (context ID, control header, fragment) items."""
    body = b"".join(struct.pack(">LBB", len(d) + 2, cx, control) + d for cx, control, d in items)
    return struct.pack(">BBL", 0x04, 0, len(body)) + body


def command(message_id: int, sop_instance: str) -> bytes:
    request = C_STORE()
    request.MessageID = message_id
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = sop_instance
    request.Priority = 2
    request.DataSet = io.BytesIO(b"present")
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    return encode(message.command_set, True, True)


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def arrangements(cx: int, cmd: bytes, data: bytes) -> dict[str, list[bytes]]:
    """The same C-STORE request cut into PDUs in the ways the standard allows."""
    chunks = pieces(data, 700)
    last = len(chunks) - 1
    return {
        "command, then one PDU per fragment": [
            pdu((cx, 3, cmd)),
            *(pdu((cx, 2 if i == last else 0, c)) for i, c in enumerate(chunks)),
        ],
        "command and the first fragments in one PDU": [
            pdu((cx, 3, cmd), (cx, 0, chunks[0]), (cx, 0, chunks[1])),
            pdu(*((cx, 2 if i == last else 0, c) for i, c in enumerate(chunks) if i > 1)),
        ],
        "command in two fragments": [
            pdu((cx, 1, cmd[:20])),
            pdu((cx, 3, cmd[20:])),
            pdu(*((cx, 2 if i == last else 0, c) for i, c in enumerate(chunks))),
        ],
        "the whole request in one PDU": [
            pdu((cx, 3, cmd), *((cx, 2 if i == last else 0, c) for i, c in enumerate(chunks)))
        ],
        "an empty last fragment": [
            pdu((cx, 3, cmd)),
            pdu(*((cx, 0, c) for c in chunks)),
            pdu((cx, 2, b"")),
        ],
    }


ARRANGEMENTS = list(arrangements(1, b"command", b"x" * 2000))


def associate(port: int):
    ae = AE(ae_title="CUTTER")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, EXPLICIT_LE)
    assoc = ae.associate("127.0.0.1", port, ae_title="EMIX")
    assert assoc.is_established
    cx = next(c.context_id for c in assoc.accepted_contexts if c.abstract_syntax == CTImageStorage)
    return assoc, cx


def spool_files(listener) -> list[Path]:
    return list((listener.home / "dimse-listen").glob("dimse-*/instances/*"))


@pytest.mark.e2e
def test_every_way_of_cutting_a_c_store_into_pdus_arrives_identical(offline_listener, tmp_path):
    assoc, cx = associate(offline_listener.port)
    # pynetdicom's reactor would take the responses as unexpected messages: paused, as
    # pynetdicom does while it runs an operation of its own
    assoc._reactor_checkpoint.clear()
    wait_for(lambda: assoc._is_paused, 10, "the SCU's reactor paused")
    sent: dict[str, bytes] = {}
    try:
        for message_id, name in enumerate(ARRANGEMENTS, start=1):
            ds = pydicom.dcmread(CT)
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            copy = tmp_path / f"{message_id}.dcm"
            ds.save_as(copy, enforce_file_format=True)
            data = dataset_bytes(copy)
            cmd = command(message_id, ds.SOPInstanceUID)
            for chunk in arrangements(cx, cmd, data)[name]:
                assoc.dul.socket.send(chunk)
            _, rsp = assoc.dimse.get_msg(block=True)
            assert rsp is not None, name
            assert rsp.Status == 0x0000, name
            assert rsp.MessageIDBeingRespondedTo == message_id, name
            sent[ds.SOPInstanceUID] = data
    finally:
        assoc._reactor_checkpoint.set()
        assoc.release()
    kept = {
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: dataset_bytes(p)
        for p in spool_files(offline_listener)
    }
    assert kept == sent
    assert offline_listener.spooled() == len(sent)


@pytest.mark.e2e
@pytest.mark.parametrize(
    "bad",
    [
        "an item running past its PDU",
        "a command inside the data set",
        "an abort mid data set",
        "the connection lost mid data set",
    ],
)
def test_an_unfinished_data_set_ends_that_association_and_leaves_no_file(offline_listener, bad):
    assoc, cx = associate(offline_listener.port)
    data = dataset_bytes(CT)
    assoc.dul.socket.send(pdu((cx, 3, command(1, generate_uid()))))
    assoc.dul.socket.send(pdu((cx, 0, data[:4000])))
    wait_for(lambda: spool_files(offline_listener), 10, "the data set's file")
    raw = assoc.dul.socket.socket
    if bad == "an item running past its PDU":
        item = struct.pack(">LBB", 5000, cx, 0) + data[4000:4100]
        raw.sendall(struct.pack(">BBL", 0x04, 0, len(item)) + item)
    elif bad == "a command inside the data set":
        raw.sendall(pdu((cx, 0, data[4000:5000]), (cx, 3, command(2, generate_uid()))))
    elif bad == "an abort mid data set":
        assoc.abort()
    else:
        raw.shutdown(2)
        raw.close()
    time.sleep(0.3)
    assoc.abort()
    wait_for(lambda: not spool_files(offline_listener), 10, "the unfinished file removed")
    assert offline_listener.alive(), offline_listener.log_text()
    if DCMTK:
        assert storescu(offline_listener.port, [CT]).returncode == 0
        wait_for(lambda: offline_listener.spooled() == 1, 10, "the next instance kept")
    time.sleep(0.2)
    assert offline_listener.spooled() == (1 if DCMTK else 0)
