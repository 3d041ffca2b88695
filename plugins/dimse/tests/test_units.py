"""Fast, in-process: AE addresses, routing rules, the spool's journal."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from emix_dimse.listener import Route, Router, parse_routes
from emix_dimse.peers import check_ae_title, parse_allow, parse_peer
from emix_dimse.spool import Spool
from pydicom.data import get_testdata_file

from emix_core import ConfigError

CT = Path(get_testdata_file("CT_small.dcm"))
MR = Path(get_testdata_file("MR_small.dcm"))


def test_peer_addresses_are_parsed_and_bad_ones_refused():
    peer = parse_peer("ORTHANC@pacs.example.org:4242")
    assert (peer.ae_title, peer.host, peer.port) == ("ORTHANC", "pacs.example.org", 4242)
    assert parse_peer("PACS@[::1]:104").host == "::1"
    for bad in (
        "ORTHANC@pacs",
        "pacs:104",
        "@h:1",
        "A@h:0",
        "A@h:70000",
        "A\\B@h:1",
        "SEVENTEEN_CHARS_X@h:1",
    ):
        with pytest.raises(ConfigError):
            parse_peer(bad)
    with pytest.raises(ConfigError):
        check_ae_title("   ")


def test_allowed_callers_match_title_and_host():
    anywhere = parse_allow("CT_ROOM_1")
    assert anywhere.matches("CT_ROOM_1", "10.9.8.7") and not anywhere.matches("CT_ROOM_2", "x")
    local = parse_allow("PACS@127.0.0.1")
    assert local.matches("PACS", "127.0.0.1")
    assert local.matches("PACS", "::ffff:127.0.0.1")  # IPv4 seen through an IPv6 socket
    assert not local.matches("PACS", "127.0.0.2")
    assert parse_allow("PACS@localhost").matches("PACS", "127.0.0.1")


def test_routes_by_calling_ae_then_data_set_then_default():
    router = Router(
        routes=parse_routes(
            [
                {"calling_ae": "CT_*", "to": "northside"},
                {"match": {"Modality": "MR"}, "to": ["lakeside", "northside"]},
            ],
            "test",
        ),
        default=["mercy"],
    )
    assert router.recipients("CT_ROOM_1", MR) == ["northside"]
    assert router.recipients("PACS", MR) == ["lakeside", "northside"]
    assert router.recipients("PACS", CT) == ["mercy"]
    assert Router([Route(["x"], match={"Modality": "MR"})]).recipients("PACS", CT) == []
    for bad in ([{"to": ""}], [{"calling_ae": "X"}], [{"to": "x", "when": 1}], ["x"]):
        with pytest.raises(ConfigError):
            parse_routes(bad, "test")


def received(tmp_path: Path, source: Path, name: str) -> Path:
    copy = tmp_path / name
    shutil.copyfile(source, copy)
    return copy


def test_spool_keeps_batches_and_forgets_sent_instances(tmp_path):
    spool = Spool(tmp_path / "spool")
    first = spool.keep(received(tmp_path, CT, "a"), "1.2.3", "1.2.3.1", ["lakeside"])
    spool.keep(received(tmp_path, MR, "b"), "1.2.3", "1.2.3.2", ["lakeside"])
    # the same instance again, before the study left: kept once, the newest copy
    again = spool.keep(received(tmp_path, CT, "c"), "1.2.3", "1.2.3.1", ["lakeside"])
    assert not first.path.exists() and again.path.exists()
    assert spool.due_groups(60, set(), now=first_arrival(spool)) == []
    [key] = spool.due_groups(0, set(), now=first_arrival(spool) + 1)
    assert spool.due_groups(0, {key}, now=first_arrival(spool) + 1) == []  # still arriving
    batch = spool.open_batch(key)
    assert batch is not None and len(batch.files) == 2 and batch.recipients == ["lakeside"]
    # what arrives while a batch is out waits for the next one
    late = spool.keep(received(tmp_path, CT, "d"), "1.2.3", "1.2.3.3", ["lakeside"])
    spool.note_sealing(batch.id, "pkg-1")
    [pending] = spool.unfinished()
    assert (pending.state, pending.package_id) == ("sealing", "pkg-1")
    spool.sent(batch.id, "pkg-1")
    assert not any(f.exists() for f in batch.files) and late.path.exists()
    status = spool.status()
    assert status["waiting_instances"] == 1 and status["recent_packages"] == ["pkg-1"]


def test_spool_requeues_what_the_hub_did_not_take_and_removes_strays(tmp_path):
    spool = Spool(tmp_path / "spool")
    a = spool.keep(received(tmp_path, CT, "a"), "9.9", "9.9.1", ["lakeside"])
    spool.keep(received(tmp_path, MR, "b"), "9.9", "9.9.2", ["lakeside"])
    batch = spool.open_batch(a.group_key)
    spool.requeue(batch.id, [a.path])
    spool.sent(batch.id, "pkg-2")
    assert a.path.exists() and spool.status()["waiting_instances"] == 1
    # a file written but never journaled (crash before the answer) is not kept
    stray = spool.files / "0123.dcm"
    shutil.copyfile(CT, stray)
    assert spool.remove_strays() == 1 and not stray.exists() and a.path.exists()


def first_arrival(spool: Spool) -> float:
    return min(r["last_arrival"] for r in spool.db().execute("SELECT last_arrival FROM groups"))


def test_listener_queue_depths_count_waiting_sending_and_retried_instances(tmp_path: Path):
    from emix_core import Gateway

    settings = {"home": str(tmp_path / "home"), "hub_url": "http://127.0.0.1:9", "token": "x"}
    source = {"kind": "dimse", "name": "pacs-push", "ae_title": "EMIX", "port": 0, "to": "lake"}
    gateway = Gateway(tmp_path / "gateway.toml", settings, sources=[source])
    listener = gateway.sources[0]
    assert gateway.queue_depths()["source:pacs-push"] == {
        "pending": 0, "in_flight": 0, "failed": 0, "retrying": 0
    }  # fmt: skip
    for number, study in enumerate(("1.2.3", "1.2.3", "1.2.4")):
        received = tmp_path / f"in-{number}.dcm"
        shutil.copy(get_testdata_file("CT_small.dcm"), received)
        listener.spool.keep(received, study, f"1.2.9.{number}", ["lake"])
    assert gateway.queue_depths()["source:pacs-push"]["pending"] == 3
    first = next(iter(listener.spool.due_groups(0, set(), time.time() + 10)))
    listener.spool.open_batch(first)
    batch = listener.spool.unfinished(time.time())[0]
    listener.spool.failed(batch.id, "hub down", time.time() + 60)
    depths = gateway.queue_depths()["source:pacs-push"]
    assert depths["pending"] + depths["in_flight"] == 3 and depths["retrying"] >= 1
    assert depths["in_flight"] == depths["retrying"] and depths["failed"] == 0
