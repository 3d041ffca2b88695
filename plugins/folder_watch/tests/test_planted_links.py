"""Someone with write access to a gateway folder plants symbolic links: none is followed.

The attacker links the inbox's sender folder to another facility's folder and the
``failed`` folder to a place of their choosing; the gateway puts each link aside with a
note, writes into real folders of its own, and the rest of the work goes on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from emix_core import generate_study
from plugins.folder_watch.tests.sites import files_under, wait_for

pytestmark = pytest.mark.e2e


def test_links_planted_in_the_inbox_and_failed_folders_are_put_aside(sites, tmp_path: Path):
    mercy, lakeside = sites("mercy"), sites("lakeside")
    other_facility = tmp_path / "other-facility-inbox"
    elsewhere = tmp_path / "attacker-choice"
    other_facility.mkdir()
    elsewhere.mkdir()
    (lakeside.folder("inbox")).mkdir(parents=True, exist_ok=True)
    (lakeside.folder("inbox") / "mercy").symlink_to(other_facility)
    mercy.folder("failed").mkdir(parents=True, exist_ok=True)
    (mercy.folder("failed") / "lakeside").symlink_to(elsewhere)

    slices = generate_study(tmp_path / "study", slices=3, series=1, rows=64, columns=64)
    outbox = mercy.outbox_for("lakeside") / "study"
    outbox.mkdir()
    for path in slices:
        (outbox / path.name).write_bytes(path.read_bytes())
    (outbox / "notes.bin").write_bytes(os.urandom(4096))  # refused: not DICOM
    mercy.start()
    lakeside.start()

    (package,) = wait_for(lambda: lakeside.inbox_packages("mercy"), 60, "the delivery")
    assert not (lakeside.folder("inbox") / "mercy").is_symlink()
    assert len(list((package / "DICOM").rglob("*.dcm"))) == 3
    assert files_under(other_facility) == []  # nothing written through the link
    planted = [p for p in lakeside.folder("inbox").iterdir() if p.name.endswith(".planted")]
    assert len(planted) == 1 and planted[0].is_symlink()
    note = planted[0].with_name(planted[0].name + ".error.txt").read_text()
    assert "never follows links" in note

    failed_note = mercy.folder("failed") / "lakeside" / "study" / "notes.bin.error.txt"
    wait_for(failed_note.exists, 30, "the refused file in the real failed folder")
    assert not (mercy.folder("failed") / "lakeside").is_symlink()
    assert files_under(elsewhere) == []
    events = [json.loads(line) for line in lakeside.log_text().splitlines() if "{" in line]
    (quarantined,) = [e for e in events if e.get("event") == "inbox.link_quarantined"]
    assert set(quarantined) == {"time", "level", "event", "destination"}  # no path, no name
