"""The byte path of an upload: file → batch body → socket → hub body reader → blob.

Each stage avoids copies and waits (reused buffers, reads straight from the socket,
fsync outside the package lock); these tests prove that the bytes still arrive whole,
in order, and durable before they are visible.
"""

from __future__ import annotations

import hashlib
import io
import socket
import threading
import time
from pathlib import Path

import pytest
from gunicorn.http.body import Body, LengthReader
from gunicorn.http.unreader import SocketUnreader

from emix_core import frames
from emix_core.hub import packages as svc
from emix_core.hub.worker import SocketBody
from emix_core.store import blobs
from emix_core.store.blobs import FilesystemBlobStore


# --------------------------------------------------------------------------- hub body
def _body_over_socket(payload: bytes, after: bytes = b"", early: bytes = b""):
    """gunicorn's body of ``payload`` on a socket, ``after`` it the next pipelined request;
    ``early``: body bytes gunicorn's reader already holds (read with the headers)."""
    server, client = socket.socketpair()
    server.settimeout(10)

    def send() -> None:
        client.sendall(payload[len(early) :] + after)
        client.shutdown(socket.SHUT_WR)

    threading.Thread(target=send, daemon=True).start()
    unreader = SocketUnreader(server)
    unreader.buf.write(early)
    return SocketBody(Body(LengthReader(unreader, len(payload)))), unreader, (server, client)


def test_socket_body_gives_the_body_in_order_however_it_is_read() -> None:
    payload = bytes(range(256)) * 3000  # 768000 bytes
    body, unreader, sockets = _body_over_socket(payload, after=b"GET /next", early=payload[:100])
    parts = [body.read(4), body.read(40)]
    big = bytearray(300_000)
    got = body.readinto(big)
    parts.append(bytes(big[:got]))
    parts.append(body.read(7))
    parts.append(body.read())  # the rest, through gunicorn's own reader
    assert b"".join(parts) == payload
    assert body.readinto(bytearray(10)) == 0 and body.read(5) == b""
    # the next request on the connection is untouched
    assert unreader.read(9) == b"GET /next"
    for s in sockets:
        s.close()


def test_socket_body_small_reads_after_a_large_one_and_readline_mix() -> None:
    payload = b"line one\nline two\n" + b"x" * 200_000
    body, _unreader, sockets = _body_over_socket(payload)
    assert body.read(5) == b"line "  # a small read buffers ahead of the caller
    assert body.readline() == b"one\n"  # readline goes through gunicorn with what was held
    view = memoryview(bytearray(len(payload)))
    filled = svc.fill(body, view)
    assert bytes(view[:filled]) == payload[len(b"line one\n") :]
    for s in sockets:
        s.close()


def test_asking_a_small_body_for_a_gigabyte_allocates_only_the_body() -> None:
    body, _unreader, sockets = _body_over_socket(b"tiny body")
    assert body.read(2**40) == b"tiny body"  # a terabyte buffer would fail here
    for s in sockets:
        s.close()


def test_a_stalled_body_read_fails_and_marks_the_connection_unusable() -> None:
    server, client = socket.socketpair()
    client.sendall(b"only part")
    server.settimeout(0.2)
    body = SocketBody(Body(LengthReader(SocketUnreader(server), 1000)))
    assert body.read(9) == b"only part"
    with pytest.raises(OSError):
        body.readinto(bytearray(500))
    assert body.failed
    server.close()
    client.close()


def test_fill_reads_a_plain_stream_without_readinto() -> None:
    view = memoryview(bytearray(10))
    assert svc.fill(io.BufferedReader(io.BytesIO(b"abcdefghijkl")), view) == 10
    assert bytes(view) == b"abcdefghij"
    assert svc.fill(io.BytesIO(b"abc"), memoryview(bytearray(10))) == 3


# --------------------------------------------------------------------------- batch body
def _parse(body: bytes) -> dict[int, bytes]:
    stream = io.BytesIO(body)
    out = {}
    while (header := frames.read_header(stream)) is not None:
        data = frames.read_exactly(stream, header.size)
        assert frames.read_exactly(stream, frames.DIGEST_SIZE) == hashlib.sha256(data).digest()
        out[header.id] = data
    return out


@pytest.mark.parametrize("views", [False, True])
def test_batch_body_frames_every_file_with_its_digest(tmp_path: Path, views: bool) -> None:
    sizes = [0, 1, 5000, frames.SEND_BLOCK - 30, frames.SEND_BLOCK, 3 * frames.SEND_BLOCK + 7]
    items = []
    for i, size in enumerate(sizes, start=1):
        path = tmp_path / f"f{i}"
        path.write_bytes(bytes((i * 7 + n) % 251 for n in range(size)))
        items.append(frames.OutgoingItem(i, path, size, "application/dicom"))
    reader = frames.BatchReader(items, views=views)
    blocks = []
    while block := reader.read(frames.SEND_BLOCK):
        assert len(block) <= frames.SEND_BLOCK
        blocks.append(bytes(block))  # a view is valid until the next read: keep a copy
    body = b"".join(blocks)
    assert len(body) == len(reader)
    received = _parse(body)
    assert received == {item.id: item.path.read_bytes() for item in items}
    assert reader.digests == {i: hashlib.sha256(d).hexdigest() for i, d in received.items()}


def test_small_files_share_a_socket_write(tmp_path: Path) -> None:
    items = []
    for i in range(1, 51):
        path = tmp_path / f"small{i}"
        path.write_bytes(b"%d" % i * 100)
        items.append(frames.OutgoingItem(i, path, path.stat().st_size, "application/pdf"))
    reader = frames.BatchReader(items, views=True)
    writes = 0
    while reader.read(frames.SEND_BLOCK):
        writes += 1
    assert writes == 1  # headers, bytes and digests of 50 files in one block


def test_a_file_that_shrinks_while_sent_fails_the_batch(tmp_path: Path) -> None:
    path = tmp_path / "shrinking"
    path.write_bytes(b"z" * 1000)
    reader = frames.BatchReader([frames.OutgoingItem(1, path, 2000, "application/pdf")])
    with pytest.raises(OSError, match="shrank"):
        reader.read()


# --------------------------------------------------------------------------- blob writer
def test_a_synced_blob_is_durable_but_not_visible_until_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[int] = []
    monkeypatch.setattr(blobs, "start_writeback", started.append)
    store = FilesystemBlobStore(tmp_path / "blobs")
    writer = store.writer("p1/1")
    writer.write(b"h" * 27)
    assert not started  # a header alone is not worth a writeback
    writer.write(b"c" * blobs.WRITEBACK_AFTER)
    assert len(started) == 1  # the disk starts on it at once
    writer.sync()
    assert not store.exists("p1/1")
    writer.commit()
    assert b"".join(store.read("p1/1")) == b"h" * 27 + b"c" * blobs.WRITEBACK_AFTER


def test_writeback_is_asked_of_the_kernel_without_failing(tmp_path: Path) -> None:
    path = tmp_path / "f"
    with open(path, "wb") as handle:
        handle.write(b"x" * 100_000)
        blobs.start_writeback(handle.fileno())  # Linux: sync_file_range; elsewhere nothing
    assert path.stat().st_size == 100_000


def test_batch_blobs_are_fsynced_before_the_package_lock_is_taken(
    hub_app, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    lock = threading.Lock()
    real_fsync, real_lock = blobs.os.fsync, svc.lock_open_package

    def fsync(fd: int) -> None:
        with lock:
            events.append("fsync")
        real_fsync(fd)

    def lock_package(session, package_id) -> None:  # type: ignore[no-untyped-def]
        with lock:
            events.append("lock")
        real_lock(session, package_id)

    monkeypatch.setattr(blobs.os, "fsync", fsync)
    monkeypatch.setattr(svc, "lock_open_package", lock_package)
    client = hub_app.client
    headers = hub_app.headers("mercy")
    package = client.post("/api/v1/packages", json={"to": ["lakeside"]}, headers=headers)
    package_id = package.get_json()["id"]
    items = [(i, b"item %d " % i * 5000) for i in (1, 2, 3)]
    body = b"".join(
        frames.encode_header(i, len(data), "application/pdf") + data + hashlib.sha256(data).digest()
        for i, data in items
    )
    answer = client.post(
        f"/api/v1/packages/{package_id}/items",
        data=body + frames.END_MAGIC,
        headers={**headers, "Content-Type": frames.MEDIA_TYPE},
    )
    assert answer.status_code == 201 and answer.get_json()["stored"] == [1, 2, 3]
    # each blob once, then under the lock only the folder (the renames)
    assert events == ["fsync", "fsync", "fsync", "lock", "fsync"]
    held = client.get(f"/api/v1/packages/{package_id}/uploaded", headers=headers).get_json()
    assert {int(k): v["sha256"] for k, v in held["items"].items()} == {
        i: hashlib.sha256(data).hexdigest() for i, data in items
    }


def test_a_failing_fsync_fails_the_batch_only_after_every_fsync_finished(tmp_path: Path) -> None:
    finished: list[str] = []

    class Writer:
        def __init__(self, name: str, fails: bool) -> None:
            self.name, self.fails = name, fails

        def sync(self) -> None:
            if self.fails:
                raise OSError("disk full")
            time.sleep(0.05)
            finished.append(self.name)

    writers = [Writer("a", True), Writer("b", False), Writer("c", False)]
    with pytest.raises(OSError, match="disk full"):
        svc.sync_all(writers)
    assert sorted(finished) == ["b", "c"]  # none still running when the batch is aborted


# --------------------------------------------------------------------------- end to end
@pytest.mark.e2e
def test_a_study_sent_over_tls_is_stored_byte_for_byte(tmp_path: Path) -> None:
    """Bodies read straight from a TLS socket arrive whole, as over plain HTTP."""
    import os
    import signal
    import subprocess
    import sys

    from emix_core import generate_study
    from emix_core.hub.context import init_hub_home
    from emix_core.testing import (
        HubProcess,
        emix_json,
        free_port,
        make_certificates,
        wait_for_http,
    )

    certificates = make_certificates(tmp_path / "tls")
    home, port = tmp_path / "hub", free_port()
    init_hub_home(home, port=port)
    hub = HubProcess(home=home, port=port)
    hub.add_facility("Mercy General", "admin@mercy.example.org", "mercy")
    hub.add_facility("Lakeside Imaging", "it@lakeside.example.org", "lakeside")
    server = str(certificates.server)
    process = subprocess.Popen(
        [sys.executable, "-m", "emix_core", "hub", "serve", "--home", str(home)]
        + ["--port", str(port), "--tls-cert", server, "--tls-key", server],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        url = f"https://127.0.0.1:{port}"
        wait_for_http(f"{url}/healthz", process, verify=str(certificates.ca))
        files = generate_study(tmp_path / "study", slices=12, series=2)
        env = {
            "EMIX_HOME": str(tmp_path / "home-mercy"),
            "EMIX_HUB_URL": url,
            "EMIX_TOKEN": hub.facilities["mercy"]["token"],
            "EMIX_CA_BUNDLE": str(certificates.ca),
        }
        sent = emix_json("send", str(tmp_path / "study"), "--to", "lakeside", env=env)
        assert sent["items"] == len(files) and not sent["failed"]
        out = tmp_path / "received"
        emix_json(
            "receive",
            sent["package"],
            "--out",
            str(out),
            env={
                **env,
                "EMIX_HOME": str(tmp_path / "home-lakeside"),
                "EMIX_TOKEN": hub.facilities["lakeside"]["token"],
            },
        )
        received = {hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*.dcm")}
        assert received == {hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)


def test_a_plugins_blob_writer_without_sync_still_stores() -> None:
    """``sync`` is optional in the blob-writer protocol: a store written before it existed
    (its ``commit`` makes the blob durable) keeps working."""
    from emix_core.hub.packages import sync_all

    class Older:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def write(self, data: bytes) -> None:
            pass

        def commit(self) -> None:
            self.calls.append("commit")

        def abort(self) -> None:
            pass

    class Newer(Older):
        def sync(self) -> None:
            self.calls.append("sync")

    older, newer, newest = Older(), Newer(), Newer()
    sync_all([older, newer, newest])
    assert older.calls == [] and newer.calls == ["sync"] and newest.calls == ["sync"]
