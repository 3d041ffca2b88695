"""emix hub backup / restore: a package sent before the backup is received from the restore."""

from __future__ import annotations

from pathlib import Path

import pytest

from emix_core import generate_study
from emix_core.testing import HubProcess, emix, emix_json, free_port


@pytest.mark.e2e
def test_restore_on_a_new_layout_delivers_a_package_sent_before_backup(
    hub, mercy, lakeside, tmp_path: Path
) -> None:
    study = tmp_path / "study"
    generate_study(study, slices=6, series=1, rows=64, columns=64, seed=3)
    sent = emix_json("send", str(study), "--to", "lakeside", env=mercy.env)
    backup = tmp_path / "backups" / "2026-12-03"
    made = emix_json("hub", "backup", "--home", str(hub.home), "--to", str(backup))  # live hub
    assert made["blobs"]["files"] >= 6
    assert (backup / "keys" / "kek.key").stat().st_mode & 0o077 == 0
    refused = emix("hub", "backup", "--home", str(hub.home), "--to", str(backup), check=False)
    assert "not empty" in refused.stderr
    hub.stop()

    new_home = tmp_path / "srv" / "other-disk" / "emix-hub"
    restored = emix_json("hub", "restore", "--from", str(backup), "--home", str(new_home))
    assert restored["audit_ok"] is True
    moved = HubProcess(home=new_home, port=free_port())
    moved.start()
    try:
        env = {**lakeside.env, "EMIX_HUB_URL": moved.url}
        assert [p["id"] for p in emix_json("inbox", env=env)["packages"]] == [sent["package"]]
        got = emix_json("receive", sent["package"], "--out", str(tmp_path / "in"), env=env)
        assert got["items"] == 6
        assert emix("audit", "verify", "--home", str(new_home)).returncode == 0
    finally:
        moved.stop()
