"""Progressive packages: signed manifest parts, read and verified before the seal."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from emix_core import crypto, frames, generate_study
from emix_core.client import sender as sender_module
from emix_core.client.home import LocalHome
from emix_core.client.progressive import ProgressiveReception
from emix_core.client.sender import send_paths
from emix_core.content.manifest_parts import new_part, part_hash
from emix_core.errors import IntegrityError, NotFoundError, PackageNotSealed
from emix_core.testing import emix

pytestmark = pytest.mark.e2e


class SenderDies(Exception):
    """The sending process stops right before its seal request leaves."""


class DiesBeforeSeal:
    """The real hub client, but the seal never leaves: kept for the test to send later."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.manifest: dict[str, Any] | None = None

    def seal(self, package_id: str, signed: dict[str, Any]) -> Any:
        self.manifest = signed
        raise SenderDies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def unsealed(hub, mercy, lakeside, tmp_path: Path, monkeypatch) -> dict[str, Any]:
    """A 12-slice study sent progressively in six parts; the sender dies before the seal."""
    monkeypatch.setattr(sender_module, "PROGRESSIVE_BATCH_BYTES", 20_000)
    monkeypatch.setattr(sender_module, "PROGRESSIVE_FIRST_BATCH_BYTES", 20_000)
    monkeypatch.setattr(sender_module, "PROGRESSIVE_MIN_BYTES", 0)
    study = tmp_path / "study"
    files = generate_study(study, slices=12, series=1, rows=64, columns=64, seed=3)
    home = LocalHome(mercy.home)
    client = DiesBeforeSeal(home.client(hub.url, mercy.token))
    opened: list[str] = []
    with pytest.raises(SenderDies):
        send_paths([study], ["lakeside"], client=client, home=home, parallel=2,
                   progressive=True, on_package=lambda p, _r: opened.append(p))  # fmt: skip
    b_home = LocalHome(lakeside.home)
    return {
        "package": opened[0],
        "files": {sha256(p): p for p in files},
        "seal": lambda: home.client(hub.url, mercy.token).seal(opened[0], client.manifest),
        "manifest": client.manifest,
        "b_home": b_home,
        "b_client": b_home.client(hub.url, lakeside.token),
    }


def test_parts_are_taken_before_the_seal_while_the_package_stays_invisible_elsewhere(
    unsealed, lakeside, tmp_path: Path
):
    package_id, b_client = unsealed["package"], unsealed["b_client"]
    # the all-or-nothing view: not in the inbox, not receivable
    assert package_id not in {p["id"] for p in b_client.inbox()}
    with pytest.raises(NotFoundError):
        b_client.manifest(package_id)
    refused = emix("receive", package_id, "--out", str(tmp_path / "cli"), env=lakeside.env,
                   check=False)  # fmt: skip
    assert refused.returncode == 1 and not (tmp_path / "cli" / package_id).exists()
    # a receiving gateway that opts in sees it open, with its six signed parts
    listed = {p["id"]: p for p in b_client.inbox(progressive=True)}
    assert listed[package_id]["state"] == "open"
    answer = b_client.parts(package_id)
    assert (answer["state"], answer["count"]) == ("open", 6)
    assert [p["document"]["part"] for p in answer["parts"]] == [1, 2, 3, 4, 5, 6]
    manifest = unsealed["manifest"]["document"]
    assert manifest["parts"] == 6 and manifest["chain"] == part_hash(answer["parts"][-1])

    handed: list[tuple[int, str]] = []
    spool = tmp_path / "spool"
    reception = ProgressiveReception(
        package_id, spool, client=b_client, home=unsealed["b_home"],
        on_verified=lambda run: handed.extend((i.id, sha256(p)) for i, p in run),
        wait=0.2, idle=0.5,
    )  # fmt: skip
    with pytest.raises(PackageNotSealed):
        reception.run()
    # every instance handed over before the seal, each verified against its part
    assert sorted(i for i, _ in handed) == list(range(1, 13))
    assert {digest for _, digest in handed} == set(unsealed["files"])
    assert not (spool / package_id).exists()  # the whole package is not there yet

    unsealed["seal"]()
    received = reception.run()  # continues where it stopped: nothing handed over twice
    assert len(handed) == 12
    assert {sha256(p) for _, p in received.items} == set(unsealed["files"])
    assert package_id in {p["id"] for p in b_client.inbox()}


def test_the_hub_refuses_parts_not_signed_by_the_sender_out_of_chain_or_not_stored(
    hub, mercy, lakeside, tmp_path: Path
):
    study = tmp_path / "study"
    files = sorted(generate_study(study, slices=3, series=1, rows=64, columns=64, seed=5))
    home = LocalHome(mercy.home)
    client = home.client(hub.url, mercy.token)
    home.register_key(client)
    package_id = client.open_package(["lakeside"])["id"]
    outgoing = [
        frames.OutgoingItem(n, path, path.stat().st_size, "application/dicom")
        for n, path in enumerate(files, start=1)
    ]
    stored, _ = client.upload_batch(package_id, outgoing)
    items = [
        {"id": n, "name": f"{n}.dcm", "media_type": "application/dicom",
         "size": files[n - 1].stat().st_size, "sha256": stored[n]}
        for n in (1, 2)
    ]  # fmt: skip

    def part(number: int, previous: str, listed: list[dict], key: Any = None) -> dict:
        document = new_part(package_id, "mercy", number, previous, listed)
        return crypto.sign_document(key or home.signing_key, document)

    other_key = LocalHome(lakeside.home).signing_key
    wrong_hash = [{**items[0], "sha256": "0" * 64}]
    for bad, expected in (
        (part(1, "", items, other_key), "registered key"),
        (part(2, "", items), "out of its chain"),
        (part(1, "f" * 64, items), "out of its chain"),
        (part(1, "", wrong_hash), "does not hold"),
    ):
        with pytest.raises(IntegrityError, match=expected):
            client.post_part(package_id, bad)
    first = part(1, "", items[:1])
    assert client.post_part(package_id, first)["part"] == 1
    with pytest.raises(IntegrityError, match="earlier part"):
        client.post_part(package_id, part(2, part_hash(first), items))
    second = part(2, part_hash(first), items[1:])
    client.post_part(package_id, second)
    # before the seal a recipient reads only what a signed part lists
    b_client = LocalHome(lakeside.home).client(hub.url, lakeside.token)
    sink = tmp_path / "sink"
    sink.mkdir()

    def target(header: frames.FrameHeader) -> Any:
        return open(sink / str(header.id), "wb")  # noqa: SIM115 - a test sink

    assert b_client.download_batch(package_id, 1, 1, target, part=1) == {1: stored[1]}
    for first, last, kw in ((3, 3, {}), (1, 2, {"part": 1}), (2, 2, {"part": 9})):
        with pytest.raises(NotFoundError):
            b_client.download_batch(package_id, first, last, target, **kw)

    manifest = {
        "format": "emix-manifest/1", "package": package_id, "sender": "mercy",
        "recipients": ["lakeside"], "created": "2026-01-01T00:00:00+00:00",
        "items": [*items, {**items[0], "id": 3, "name": "3.dcm", "sha256": stored[3],
                           "size": files[2].stat().st_size}],
    }  # fmt: skip
    with pytest.raises(IntegrityError, match="chain"):  # the seal must close the chain
        client.seal(package_id, crypto.sign_document(home.signing_key, manifest))
    with pytest.raises(IntegrityError, match="chain"):  # ... at its real head
        client.seal(package_id, crypto.sign_document(
            home.signing_key, {**manifest, "parts": 2, "chain": part_hash(first)}))  # fmt: skip
    sealed = {**manifest, "parts": 2, "chain": part_hash(second)}
    assert client.seal(package_id, crypto.sign_document(home.signing_key, sealed))["state"]
    with pytest.raises(Exception, match="sealed"):  # no part after the seal
        client.post_part(package_id, part(3, part_hash(second), items[:1]))


class Tampering:
    """Lakeside's client, between it and the hub: alters what the hub answers."""

    def __init__(self, client: Any, how: str) -> None:
        self._client = client
        self.how = how

    def parts(self, package_id: str, **kw: Any) -> dict[str, Any]:
        answer = self._client.parts(package_id, **kw)
        if self.how == "altered part" and answer["parts"]:
            answer["parts"][1]["document"]["items"][0]["sha256"] = "0" * 64
        if self.how == "dropped part" and answer["parts"]:
            del answer["parts"][2]
        return answer

    def download_batch(self, package_id: str, first: int, last: int, *a: Any, **kw: Any) -> Any:
        digests = self._client.download_batch(package_id, first, last, *a, **kw)
        if self.how == "altered bytes" and first <= 5 <= last:
            digests[5] = hashlib.sha256(b"something else").hexdigest()
        return digests

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


@pytest.mark.parametrize(
    ("how", "expected", "alert"),
    [
        ("altered part", "signature", True),
        ("dropped part", "out of its chain", True),
        ("altered bytes", "does not match", False),
    ],
)
def test_a_part_or_item_that_does_not_verify_is_never_handed_over(
    unsealed, tmp_path: Path, how: str, expected: str, alert: bool
):
    package_id, b_home = unsealed["package"], unsealed["b_home"]
    handed: list[int] = []
    reception = ProgressiveReception(
        package_id, tmp_path / "spool", client=Tampering(unsealed["b_client"], how),
        home=b_home, on_verified=lambda run: handed.extend(i.id for i, _ in run),
        wait=0.2, idle=0.5,
    )  # fmt: skip
    with pytest.raises(IntegrityError, match=expected):
        reception.run()
    # only items of parts that verified before the bad one were handed over
    limit = {"altered part": 2, "dropped part": 4, "altered bytes": 4}[how]
    assert handed and max(handed) <= limit and 5 not in handed
    assert not list((tmp_path / "spool").iterdir())  # nothing unverified kept
    alerts = [
        e for e in b_home.audit_log.events(package_id=package_id, limit=None)
        if e["event_type"] == "security-alert"
    ]  # fmt: skip
    assert bool(alerts) == alert
    if alert:
        quarantined = b_home.path / "failed" / f"package-{package_id}"
        assert list(quarantined.glob("part-*.json")), "the refused part is kept"


def test_the_inbox_cursor_answers_as_soon_as_a_part_arrives(hub, mercy, lakeside, tmp_path):
    import threading
    import time

    files = sorted(generate_study(tmp_path / "s", slices=1, series=1, rows=64, columns=64))
    home = LocalHome(mercy.home)
    a_client = home.client(hub.url, mercy.token)
    home.register_key(a_client)
    b_client = LocalHome(lakeside.home).client(hub.url, lakeside.token)
    before = b_client.inbox_cursor(progressive=True)
    package_id = a_client.open_package(["lakeside"])["id"]
    stored, _ = a_client.upload_batch(
        package_id, [frames.OutgoingItem(1, files[0], files[0].stat().st_size, "application/dicom")]
    )
    # an open package without a part is nowhere yet, and moves no cursor
    assert package_id not in {p["id"] for p in b_client.inbox(progressive=True)}
    started = time.monotonic()
    assert b_client.inbox_cursor(progressive=True, since=before, wait=0.5) == before
    assert time.monotonic() - started >= 0.45  # held while nothing changed
    item = {"id": 1, "name": "1.dcm", "media_type": "application/dicom",
            "size": files[0].stat().st_size, "sha256": stored[1]}  # fmt: skip
    signed = crypto.sign_document(home.signing_key, new_part(package_id, "mercy", 1, "", [item]))
    poster = threading.Timer(0.5, lambda: a_client.post_part(package_id, signed))
    poster.start()
    started = time.monotonic()
    after = b_client.inbox_cursor(progressive=True, since=before, wait=8)
    assert after != before and time.monotonic() - started < 3
    listed = {p["id"]: p for p in b_client.inbox(progressive=True)}
    assert (listed[package_id]["state"], listed[package_id]["items"]) == ("open", 1)
    # the plain cursor (sealed packages only) did not move
    assert b_client.inbox_cursor() == before.split("/")[0]
