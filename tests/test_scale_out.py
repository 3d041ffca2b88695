"""Two hub instances on different ports sharing one PostgreSQL and one Ceph cluster,
as behind a load balancer: whatever one instance accepted, the other serves."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from email import message_from_bytes
from pathlib import Path

import pytest
import requests
from sqlalchemy import create_engine, select, text

from emix_core import crypto
from emix_core.client.home import LocalHome
from emix_core.client.sender import _item, prepare_file, summarize_studies
from emix_core.content.samples import generate_study
from emix_core.errors import ConflictError, HubUnavailable
from emix_core.hub.packages import MANIFEST_FORMAT
from emix_core.model import utcnow
from emix_core.store.db import ItemRow
from emix_core.testing import (
    PATIENT_ID,
    PATIENT_NAME,
    HubProcess,
    SmtpServer,
    emix,
    emix_json,
    free_port,
)

pytestmark = pytest.mark.e2e
MIB = 1024 * 1024


class Pair:
    """Two running instances, the database and the bucket they share."""

    def __init__(self, root: Path, a: HubProcess, b: HubProcess, url: str, bucket: str, rgw):  # type: ignore[no-untyped-def]
        self.root, self.a, self.b, self.url, self.bucket, self.rgw = root, a, b, url, bucket, rgw

    def side(self, address: str) -> Path:
        """A facility's own home (one per facility, for the whole module: its key is
        registered once)."""
        return self.root / f"side-{address}"

    def running(self) -> Pair:
        """Both instances up (a test that killed one may have failed before restarting it)."""
        for hub in (self.a, self.b):
            if hub.process is None or hub.process.poll() is not None:
                hub.start()
        return self

    def env(self, address: str, hub: HubProcess) -> dict[str, str]:
        home = self.side(address)
        token = self.a.facilities[address]["token"]
        return {"EMIX_HOME": str(home), "EMIX_HUB_URL": hub.url, "EMIX_TOKEN": token}

    def engine(self):  # type: ignore[no-untyped-def]
        return create_engine(self.url.replace("postgresql://", "postgresql+psycopg://"))

    def blobs(self) -> dict[str, bytes]:
        s3 = self.rgw.client()
        return {
            key: s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            for key in self.rgw.objects(self.bucket)
        }


@pytest.fixture(scope="module")
def mail() -> Iterator[SmtpServer]:
    """One SMTP sink for the module's two instances (tests tell their mails apart by link)."""
    from aiosmtpd.controller import Controller

    server = SmtpServer(port=free_port())

    class Handler:
        async def handle_DATA(self, _server, _session, envelope):  # noqa: N802
            server.messages.append(message_from_bytes(envelope.content))
            return "250 OK"

    controller = Controller(Handler(), hostname="127.0.0.1", port=server.port)
    controller.start()
    yield server
    controller.stop()


@pytest.fixture(scope="module")
def pair(tmp_path_factory, postgres, ceph_rgw, mail) -> Iterator[Pair]:
    """Instances ``a`` and ``b`` of one hub: same keys, same database, same bucket."""
    url = postgres.new_database()
    bucket = ceph_rgw.new_bucket()
    root = tmp_path_factory.mktemp("pair")
    shared = [
        "--database",
        url,
        "--blobs",
        f"s3://{bucket}/emix",
        "--public-url",
        "https://hub.example.org",
    ]
    hubs: list[HubProcess] = []
    with pytest.MonkeyPatch.context() as env:
        for name, value in {**ceph_rgw.env, "EMIX_SMTP_URL": mail.url}.items():
            env.setenv(name, value)  # the hubs and every CLI run inherit it
        try:
            for name in ("a", "b"):
                home, port = root / f"hub-{name}", free_port()
                if hubs:  # every instance holds the same keys
                    shutil.copytree(hubs[0].home / "keys", home / "keys")
                emix("hub", "init", "--home", str(home), "--port", str(port), *shared)
                hubs.append(HubProcess(home=home, port=port))
                hubs[-1].start()
            a, b = hubs
            a.add_facility("Mercy General", "admin@mercy.example.org", "mercy", "pdf")
            a.add_facility("Lakeside Imaging", "it@lakeside.example.org", "lakeside", "hl7")
            b.facilities = a.facilities
            yield Pair(root, a, b, url, bucket, ceph_rgw)
        finally:
            for hub in hubs:
                hub.stop()


def mails_about(server: SmtpServer, package: str, pair: Pair) -> list[str]:
    """Who was mailed about ``package``: each mail carries a one-time sign-in link, whose
    hash the shared database maps to the package."""
    import hashlib
    import re

    from sqlalchemy import text

    mailed = []
    with pair.engine().connect() as conn:
        for message in server.messages:
            body = message.get_payload(decode=True).decode()
            found = re.search(r"/signin/([A-Za-z0-9_-]+)", body)
            if not found:
                continue
            digest = hashlib.sha256(found.group(1).encode()).hexdigest()
            about = conn.execute(
                text("SELECT package_id FROM web_links WHERE token_hash = :h"), {"h": digest}
            ).scalar()
            if about == package:
                mailed.append(message["To"])
    return sorted(mailed)


def digests(root: Path) -> set[str]:
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.dcm") if p.is_file()}


def assert_no_phi_under_the_bucket(pair: Pair) -> int:
    blobs = pair.blobs()
    for key, data in blobs.items():
        for secret in (b"DICM", PATIENT_NAME.encode(), PATIENT_ID.encode()):
            assert secret not in data, f"{secret!r} in plaintext in object {key}"
            assert secret.decode() not in key
    return len(blobs)


def test_send_through_one_instance_receive_through_the_other(pair, tmp_path, mail):
    pair.running()
    study = tmp_path / "study"
    generate_study(study, slices=20, series=2, patient_name=PATIENT_NAME, patient_id=PATIENT_ID)
    mercy = pair.env("mercy", pair.a)
    sent = emix_json("send", str(study), "--to", "lakeside", env=mercy)
    assert sent["failed"] == [] and sent["items"] == 20
    package = sent["package"]

    lakeside = pair.env("lakeside", pair.b)  # the other instance
    assert [p["id"] for p in emix_json("inbox", env=lakeside)["packages"]] == [package]
    out = tmp_path / "received"
    got = emix_json("receive", package, "--out", str(out), env=lakeside)
    assert got["items"] == 20
    assert digests(out / package) == digests(study)
    mail.wait_for(1)
    time.sleep(1)
    assert mails_about(mail, package, pair) == [
        "it@lakeside.example.org"
    ]  # once, from one instance

    # only ciphertext in the bucket, one object per item plus the manifest
    assert len(pair.rgw.objects(pair.bucket, f"emix/{package}/")) == 21
    assert_no_phi_under_the_bucket(pair)
    for hub in (pair.a, pair.b):
        ready = requests.get(f"{hub.url}/readyz", timeout=10)
        assert ready.status_code == 200
        assert ready.json()["database"] == ready.json()["blobs"] == "ok"

    # retention on either instance deletes the objects (and shreds the key)
    purged = emix_json(
        "retention", "purge", "--home", str(pair.b.home), "--now", "2099-01-01T00:00:00Z"
    )
    assert package in purged["purged"]
    assert pair.rgw.objects(pair.bucket, f"emix/{package}/") == []
    gone = emix("receive", package, "--out", str(tmp_path / "again"), env=lakeside, check=False)
    assert gone.returncode != 0


def test_audit_chain_verifies_after_500_concurrent_requests_on_two_instances(pair):
    pair.running()
    token = pair.a.facilities["lakeside"]["token"]
    headers = {"Authorization": f"Bearer {token}"}
    urls = [f"{(pair.a, pair.b)[n % 2].url}/api/v1/inbox" for n in range(500)]
    count = "SELECT count(*) FROM audit_events WHERE event_type='query'"
    engine = pair.engine()
    with engine.connect() as conn:
        before = conn.scalar(text(count))

    def list_inbox(url: str) -> int:
        return requests.get(url, headers=headers, timeout=120).status_code

    with ThreadPoolExecutor(max_workers=16) as pool:
        codes = list(pool.map(list_inbox, urls))
    assert codes == [200] * 500
    for hub in (pair.a, pair.b):
        verified = emix_json("audit", "verify", "--home", str(hub.home))
        assert verified["ok"], verified
        assert verified["rows"] >= 500
    with engine.connect() as conn:
        seqs = [r[0] for r in conn.execute(text("SELECT seq FROM audit_events ORDER BY seq"))]
        listed = conn.scalar(text(count)) - before
    engine.dispose()
    assert seqs == list(range(1, len(seqs) + 1))  # one chain: no gap, no fork
    assert listed == 500


class SlowFile:
    """A file read by the HTTP client that stalls after ``stall_at`` bytes until released."""

    def __init__(self, path: Path, stall_at: int) -> None:
        self.handle = open(path, "rb")  # noqa: SIM115
        self.stall_at = stall_at
        self.sent = 0
        self.stalled = threading.Event()
        self.release = threading.Event()

    def read(self, size: int = -1) -> bytes:
        if self.sent >= self.stall_at:
            self.stalled.set()
            self.release.wait(60)
        data = self.handle.read(min(size if size > 0 else MIB, MIB))
        self.sent += len(data)
        return data


def test_kill_9_mid_upload_loses_nothing_acknowledged_and_retry_on_the_other_completes(
    pair, tmp_path
):
    pair.running()
    study = tmp_path / "study"
    generate_study(
        study / "ct",
        slices=8,
        series=1,
        patient_name=PATIENT_NAME,
        patient_id=PATIENT_ID,
        study_uid="1.2.826.0.1.3680043.8.498.1",
    )
    generate_study(
        study / "mg",
        slices=1,
        series=1,
        rows=4096,
        columns=3328,
        patient_name=PATIENT_NAME,
        patient_id=PATIENT_ID,
        study_uid="1.2.826.0.1.3680043.8.498.1",
    )
    prepared = [prepare_file(p) for p in sorted(study.rglob("*.dcm"))]
    items = [_item(n, p) for n, p in enumerate(prepared, start=1)]
    big = max(items, key=lambda i: i.size)
    assert big.size > 3 * 8 * MIB  # a mammography-sized image: several S3 parts

    sender = LocalHome(pair.side("mercy"))
    token = pair.a.facilities["mercy"]["token"]
    client_a, client_b = sender.client(pair.a.url, token), sender.client(pair.b.url, token)
    sender.register_key(client_a)
    package = client_a.create_package(["lakeside"])

    def upload(client, item, stream=None) -> None:  # type: ignore[no-untyped-def]
        path = prepared[item.id - 1].path
        item.sha256 = crypto.sha256_file(path)
        with open(path, "rb") as handle:
            client.upload_item(
                package,
                item.id,
                stream or handle,
                size=item.size,
                sha256=item.sha256,
                media_type=item.media_type,
            )

    acknowledged = [i for i in items if i is not big]
    for item in acknowledged:
        upload(client_a, item)

    slow = SlowFile(prepared[big.id - 1].path, stall_at=20 * MIB)
    failure: list[BaseException] = []

    def upload_big() -> None:
        try:
            upload(client_a, big, slow)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            failure.append(exc)

    thread = threading.Thread(target=upload_big)
    thread.start()
    assert slow.stalled.wait(60)
    s3 = pair.rgw.client()
    key = f"emix/{package}/{big.id}"
    deadline = time.monotonic() + 30
    parts: list = []
    while not parts and time.monotonic() < deadline:  # the instance is mid multipart upload
        uploads = s3.list_multipart_uploads(Bucket=pair.bucket).get("Uploads", [])
        for up in uploads:
            if up["Key"] == key:
                parts = s3.list_parts(Bucket=pair.bucket, Key=key, UploadId=up["UploadId"])
                parts = parts.get("Parts", [])
        time.sleep(0.1)
    assert parts, "the instance never started sending the big item to the object store"
    os.killpg(pair.a.process.pid, signal.SIGKILL)
    pair.a.process.wait()
    slow.release.set()
    thread.join(60)
    assert failure and isinstance(failure[0], HubUnavailable)
    assert requests.get(f"{pair.b.url}/readyz", timeout=10).status_code == 200

    # nothing acknowledged is lost; the interrupted item is not half there
    engine = pair.engine()
    with engine.connect() as conn:
        stored = conn.execute(select(ItemRow.item_id).where(ItemRow.package_id == package))
        assert sorted(r[0] for r in stored) == sorted(i.id for i in acknowledged)
    engine.dispose()
    objects = set(pair.rgw.objects(pair.bucket, f"emix/{package}/"))
    assert objects == {f"emix/{package}/{i.id}" for i in acknowledged}

    # the sender retries on the other instance: the item, then the seal
    upload(client_b, big)
    items.sort(key=lambda i: i.id)
    manifest = {
        "format": MANIFEST_FORMAT,
        "package": package,
        "sender": "mercy",
        "recipients": ["lakeside"],
        "created": utcnow().isoformat(),
        "items": [i.to_dict() for i in items],
        "studies": summarize_studies(prepared),
    }
    sealed = client_b.seal(package, crypto.sign_document(sender.signing_key, manifest))
    assert sealed["state"] == "sealed"
    lakeside = pair.env("lakeside", pair.b)
    out = tmp_path / "received"
    got = emix_json("receive", package, "--out", str(out), env=lakeside)
    assert got["items"] == len(items)
    assert digests(out / package) == digests(study)
    assert len(pair.rgw.objects(pair.bucket, f"emix/{package}/")) == len(items) + 1
    assert_no_phi_under_the_bucket(pair)

    # the dead instance's unfinished upload is collected with the package at retention
    purge = ["retention", "purge", "--home", str(pair.b.home), "--now", "2099-01-01T00:00:00Z"]
    assert package in emix_json(*purge)["purged"]
    assert pair.rgw.objects(pair.bucket, f"emix/{package}/") == []
    leftover = s3.list_multipart_uploads(Bucket=pair.bucket, Prefix=f"emix/{package}/")
    assert leftover.get("Uploads", []) == []
    pair.running()  # a back in service for the next tests


def test_seal_racing_on_two_instances_seals_and_notifies_once(pair, tmp_path, mail):
    pair.running()
    study = tmp_path / "study"
    generate_study(study, slices=2, series=1, patient_name=PATIENT_NAME, patient_id=PATIENT_ID)
    prepared = [prepare_file(p) for p in sorted(study.rglob("*.dcm"))]
    items = [_item(n, p) for n, p in enumerate(prepared, start=1)]
    sender = LocalHome(pair.side("mercy"))
    token = pair.a.facilities["mercy"]["token"]
    clients = [sender.client(hub.url, token) for hub in (pair.a, pair.b)]
    sender.register_key(clients[0])
    package = clients[0].create_package(["lakeside", "it@lakeside.example.org"])
    for item, p in zip(items, prepared, strict=True):
        item.sha256 = crypto.sha256_file(p.path)
        with open(p.path, "rb") as handle:
            clients[item.id % 2].upload_item(
                package,
                item.id,
                handle,
                size=item.size,
                sha256=item.sha256,
                media_type=item.media_type,
            )
    manifest = {
        "format": MANIFEST_FORMAT,
        "package": package,
        "sender": "mercy",
        "recipients": ["lakeside"],
        "created": utcnow().isoformat(),
        "items": [i.to_dict() for i in items],
        "studies": summarize_studies(prepared),
    }
    signed = crypto.sign_document(sender.signing_key, manifest)
    start = threading.Barrier(2)

    def seal(client) -> str:  # type: ignore[no-untyped-def]
        start.wait()
        try:
            return client.seal(package, signed)["state"]
        except ConflictError:
            return "conflict"

    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = sorted(pool.map(seal, clients))
    assert outcomes == ["conflict", "sealed"]
    time.sleep(2)  # a second notice, were there one, would have arrived by now
    # the facility's admin and the addressed member are one person here: one mail
    assert mails_about(mail, package, pair) == ["it@lakeside.example.org"]


def test_timers_lead_by_advisory_lock_on_postgresql(pair):
    from emix_core.store.db import Database

    first, second = Database(pair.url, pool_size=1), Database(pair.url, pool_size=1)
    try:
        with first.leader("retention") as leading:
            assert leading
            with second.leader("retention") as other:
                assert not other  # the other instance skips this round
            with second.leader("another-timer") as other:
                assert other  # timers are independent
        with second.leader("retention") as leading:
            assert leading  # released when the leader finished
        # a leader that dies (its connection drops) frees the lock for the others
        with first.leader("retention") as leading:
            assert leading
            with second.engine.connect() as conn:
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_locks "
                        "WHERE locktype = 'advisory' AND pid <> pg_backend_pid()"
                    )
                )
                conn.commit()
            time.sleep(0.5)
            with second.leader("retention") as other:
                assert other
    finally:
        first.engine.dispose()
        second.engine.dispose()
