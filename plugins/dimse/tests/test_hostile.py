"""Bad peers: a truncated P-DATA, an oversized PDU, a data set with a bad length, a
dataset that is not the instance announced. The listener answers or drops that
connection, and goes on serving."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from plugins.dimse.tests.helpers import DCMTK, dataset_bytes, echoscu, storescu, wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not DCMTK, reason="needs dcmtk (bash .ci/system-deps)"),
]

CT = Path(get_testdata_file("CT_small.dcm"))


def associate(port: int):
    ae = AE(ae_title="HOSTILE")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="EMIX")
    assert assoc.is_established
    return assoc


def raw_socket(assoc) -> socket.socket:
    return assoc.dul.socket.socket


def still_serving(listener) -> None:
    assert listener.alive(), listener.log_text()
    assert echoscu(listener.port).returncode == 0
    before = listener.spooled()
    result = storescu(listener.port, [CT])
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for(lambda: listener.spooled() > before, 10, "the instance in the spool")


def test_truncated_p_data_drops_that_connection_only(offline_listener):
    assoc = associate(offline_listener.port)
    sock = raw_socket(assoc)
    # a P-DATA-TF announcing 100000 bytes, cut after 20
    sock.sendall(struct.pack(">BBI", 0x04, 0, 100000) + b"\x00" * 20)
    sock.shutdown(socket.SHUT_WR)
    time.sleep(0.5)
    assoc.abort()
    still_serving(offline_listener)
    assert offline_listener.spooled() == 1


def test_oversized_pdu_is_refused_before_it_is_read(offline_listener):
    assoc = associate(offline_listener.port)
    sock = raw_socket(assoc)
    sock.sendall(struct.pack(">BBI", 0x04, 0, 0xFFFFFFF0) + b"\x00" * 65536)
    # the listener closes the connection instead of reading 4 GB into memory
    sock.settimeout(10)
    deadline = time.monotonic() + 10
    closed = False
    while time.monotonic() < deadline and not closed:
        try:
            closed = sock.recv(65536) == b""
        except (ConnectionResetError, BrokenPipeError):
            closed = True
        except TimeoutError:
            break
    assert closed
    assoc.abort()
    still_serving(offline_listener)


def test_garbage_instead_of_an_association_request(offline_listener):
    with socket.create_connection(("127.0.0.1", offline_listener.port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 10)
        time.sleep(0.2)
    still_serving(offline_listener)


def test_dataset_with_a_bad_length_is_refused_with_a_status(offline_listener, tmp_path):
    # an element claiming 4000 bytes where 4 remain: truncated on the wire
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(
        CT.read_bytes() + struct.pack("<HH2sH", 0x7FE1, 0x0010, b"LO", 4000) + b"ABCD"
    )
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the bytes as they are in the file
    try:
        assoc = associate(offline_listener.port)
        status = assoc.send_c_store(str(broken))
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert status.Status == 0xC000
    still_serving(offline_listener)
    assert offline_listener.spooled() == 1
    assert "dimse.store.refused" in offline_listener.log_text()


def test_dataset_that_is_not_the_announced_instance_is_refused(offline_listener, tmp_path):
    import io

    import pydicom
    from pydicom.filewriter import write_file_meta_info

    meta = pydicom.dcmread(CT).file_meta
    # the command announces the file meta's SOP Instance UID; the data set has another
    meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7.8.9"
    buffer = io.BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    mismatched = tmp_path / "mismatched.dcm"
    mismatched.write_bytes(buffer.getvalue() + dataset_bytes(CT))
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = associate(offline_listener.port)
        status = assoc.send_c_store(str(mismatched))
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert status.Status == 0xA900
    assert offline_listener.spooled() == 0
    still_serving(offline_listener)


def test_associations_beyond_the_cap_are_rejected_and_the_rest_served(tmp_path):
    from plugins.dimse.tests.helpers import ListenerProcess

    listener = ListenerProcess(
        tmp_path / "capped", None, "mercy", ["--to", "lakeside", "--max-associations", "1"]
    ).start()
    try:
        first = associate(listener.port)
        ae = AE(ae_title="SECOND")
        ae.add_requested_context(Verification)
        second = ae.associate("127.0.0.1", listener.port, ae_title="EMIX")
        assert second.is_rejected
        assert first.send_c_echo().Status == 0x0000
        first.release()
        # the released association's thread ends a moment later, then there is room again
        wait_for(lambda: echoscu(listener.port).returncode == 0, 10, "room for a caller")
        still_serving(listener)
    finally:
        listener.stop()
