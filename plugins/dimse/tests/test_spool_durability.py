"""The spool flushes a file, its name and its journal row together, and acknowledges only
when all three are durable: after a crash, a row whose file did not survive whole was
never acknowledged and is dropped; a refused file never stays."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from emix_dimse.spool import Spool
from pydicom.data import get_testdata_file

CT = Path(get_testdata_file("CT_small.dcm"))
MR = Path(get_testdata_file("MR_small.dcm"))


def received(tmp_path: Path, source: Path, name: str) -> Path:
    copy = tmp_path / name
    shutil.copyfile(source, copy)
    return copy


def waiting(spool: Spool) -> int:
    return spool.status()["waiting_instances"]


def test_a_kept_instance_survives_a_restart_whole(tmp_path):
    spool = Spool(tmp_path / "spool")
    kept = spool.keep(received(tmp_path, CT, "a"), "1.2", "1.2.1", ["lakeside"])
    assert kept.path.read_bytes() == CT.read_bytes() and kept.size == CT.stat().st_size
    again = Spool(tmp_path / "spool")  # the process restarted
    assert again.remove_strays() == 0 and waiting(again) == 1 and kept.path.exists()


@pytest.mark.parametrize("damage", ["missing", "shorter"])
def test_a_row_whose_file_did_not_survive_whole_is_dropped_at_start(tmp_path, damage):
    spool = Spool(tmp_path / "spool")
    good = spool.keep(received(tmp_path, CT, "a"), "1.2", "1.2.1", ["lakeside"])
    lost = spool.keep(received(tmp_path, MR, "b"), "1.2", "1.2.2", ["lakeside"])
    # what a power cut between the journal's flush and the file's leaves behind
    if damage == "missing":
        lost.path.unlink()
    else:
        os.truncate(lost.path, lost.size // 2)
    again = Spool(tmp_path / "spool")
    again.remove_strays()
    assert waiting(again) == 1 and good.path.exists()
    assert not lost.path.exists()  # the shorter copy is a stray once its row is gone
    [key] = again.due_groups(0, set(), now=9e9)
    batch = again.open_batch(key)
    assert batch is not None and batch.files == [good.path]


def test_a_received_file_refused_by_the_listener_leaves_nothing(tmp_path):
    spool = Spool(tmp_path / "spool")
    arrival = spool.receive(received(tmp_path, CT, "a"))
    assert arrival.path.parent == spool.files and arrival.size == CT.stat().st_size
    spool.discard(arrival)
    assert list(spool.files.iterdir()) == [] and waiting(spool) == 0


def test_a_file_the_disk_cannot_flush_is_not_kept(tmp_path, monkeypatch):
    import emix_dimse.spool as module

    spool = Spool(tmp_path / "spool")

    def refuse(path: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(module, "_fsync_file", refuse)
    with pytest.raises(OSError):
        spool.keep(received(tmp_path, CT, "a"), "1.2", "1.2.1", ["lakeside"])
    assert waiting(spool) == 0 and list(spool.files.iterdir()) == []
