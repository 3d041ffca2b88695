"""The facility's side keeps every share request it took until the study is sent."""

from __future__ import annotations

from pathlib import Path

from emix_smart_launch.cli import MAX_ATTEMPTS, ShareQueue

SHARE = {"id": "3f1c0a9b2d4e5f60", "study_uid": "1.2.3.4", "to": "mercy"}


def test_a_taken_request_is_on_disk_before_anything_is_tried(tmp_path: Path) -> None:
    queue = ShareQueue(tmp_path / "smart-shares")
    assert queue.keep(SHARE) is None
    # a crash here loses nothing: a new run finds the request
    (record,) = ShareQueue(tmp_path / "smart-shares").pending()
    assert record["share"] == SHARE


def test_a_failed_send_is_retried_then_put_aside_after_the_last_attempt(tmp_path: Path) -> None:
    queue = ShareQueue(tmp_path / "smart-shares")
    queue.keep(SHARE)
    failure = {"id": SHARE["id"], "to": "mercy", "sent": False, "error": "PACS down"}
    for attempt in range(1, MAX_ATTEMPTS):
        (record,) = queue.pending()
        answer = queue.settle(record, failure)
        assert answer["retry"] is True, attempt
    (record,) = queue.pending()
    assert record["attempts"] == MAX_ATTEMPTS - 1
    last = queue.settle(record, failure)
    assert last["retry"] is False and last["error"] == "PACS down; given up"
    assert queue.pending() == []
    assert (tmp_path / "smart-shares" / "failed" / f"{SHARE['id']}.json").is_file()


def test_a_sent_request_is_forgotten(tmp_path: Path) -> None:
    queue = ShareQueue(tmp_path / "smart-shares")
    queue.keep(SHARE)
    (record,) = queue.pending()
    assert queue.settle(record, {"id": SHARE["id"], "to": "mercy", "sent": True})["sent"]
    assert queue.pending() == []


def test_a_hostile_hub_cannot_name_a_file_with_a_request_id(tmp_path: Path) -> None:
    queue = ShareQueue(tmp_path / "smart-shares")
    for bad in ("../../../etc/cron.d/x", "A" * 40, "", None, "3f1c/../x"):
        answer = queue.keep({**SHARE, "id": bad})
        assert answer is not None and answer["sent"] is False
        assert "malformed" in answer["error"]
    assert queue.keep("not an object") is not None
    assert queue.pending() == []
    assert sorted(p.name for p in tmp_path.rglob("*")) == []
