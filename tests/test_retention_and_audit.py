"""Retention purges with crypto-shredding; the audit chain detects tampering (CLI)."""

from __future__ import annotations

import json
import shutil
import sqlite3

import requests

from emix_core.testing import emix, emix_json


def _send_small(study, tmp_path, env, name="small"):
    folder = tmp_path / name
    folder.mkdir()
    for p in sorted(study.rglob("*.dcm"))[:3]:
        shutil.copy(p, folder / p.name)
    return emix_json("send", str(folder), "--to", "lakeside", env=env)["package"]


def test_purge_after_expiry_shreds_keys_and_keeps_audit_and_held_packages(
    hub, mercy, lakeside, study_200, tmp_path
):
    purged_id = _send_small(study_200, tmp_path, mercy.env, "a")
    held_id = _send_small(study_200, tmp_path, mercy.env, "b")
    emix("hub", "hold", held_id, "--home", str(hub.home))

    # not yet expired: nothing happens
    assert emix_json("retention", "purge", "--home", str(hub.home))["purged"] == []
    result = emix_json(
        "retention", "purge", "--home", str(hub.home), "--now", "2099-01-01T00:00:00Z"
    )
    assert result == {"purged": [purged_id], "held": [held_id]}

    assert not (hub.home / "blobs" / purged_id).exists()
    assert (hub.home / "blobs" / held_id).exists()
    db = sqlite3.connect(hub.home / "metadata.db")
    key, summary, state = db.execute(
        "select wrapped_key, summary, state from packages where id=?", (purged_id,)
    ).fetchone()
    assert (key, summary, state) == (None, None, "purged")
    assert db.execute("pragma secure_delete").fetchone()[0] == 1
    # the WAL was checkpointed, so the destroyed key is not lingering in it
    wal = hub.home / "metadata.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0

    r = requests.get(
        f"{hub.url}/api/v1/packages/{purged_id}/manifest",
        headers={"Authorization": f"Bearer {lakeside.token}"},
    )
    assert r.status_code == 404
    listed = [p["id"] for p in emix_json("inbox", env=lakeside.env)["packages"]]
    assert purged_id not in listed
    # the audit record outlives the package
    types = [
        r[0]
        for r in sqlite3.connect(hub.home / "audit.db").execute(
            "select event_type from audit_events"
        )
    ]
    assert "study-deleted" in types
    assert emix_json("audit", "verify", "--home", str(hub.home))["ok"] is True


def test_audit_verify_names_the_first_edited_row(hub, mercy, study_200, tmp_path):
    _send_small(study_200, tmp_path, mercy.env)
    ok = emix_json("audit", "verify", "--home", str(hub.home))
    assert ok["ok"] is True and ok["rows"] >= 3
    db = sqlite3.connect(hub.home / "audit.db")
    db.execute("update audit_events set outcome = 8 where seq = 2")
    db.commit()
    result = emix("audit", "verify", "--home", str(hub.home), check=False)
    assert result.returncode == 1
    assert "first bad row 2" in result.stderr


def test_sending_side_log_is_chained_and_keeps_the_hubs_checkpoint(hub, mercy, study_200, tmp_path):
    _send_small(study_200, tmp_path, mercy.env)
    local = emix_json("audit", "verify", "--home", mercy.env["EMIX_HOME"])
    assert local["ok"] is True and local["rows"] >= 2
    # always JSON, with or without --json: what an operator redirects into a file
    printed = emix("audit", "checkpoints", "--home", mercy.env["EMIX_HOME"]).stdout
    assert json.loads(printed)["checkpoints"], "the hub's signed checkpoint is kept locally"
    saved = tmp_path / "cp.json"
    saved.write_text(printed)
    assert (
        emix_json("audit", "verify", "--home", str(hub.home), "--checkpoints", str(saved))["ok"]
        is True
    )
    # the hub operator cuts the tail of the central log: the sender's checkpoint catches it
    db = sqlite3.connect(hub.home / "audit.db")
    last = db.execute("select max(seq) from audit_events").fetchone()[0]
    db.execute("delete from audit_events where seq >= ?", (last - 1,))
    db.execute("delete from audit_checkpoints")
    db.commit()
    cut = emix("audit", "verify", "--home", str(hub.home), "--checkpoints", str(saved), check=False)
    assert cut.returncode == 1


def test_audit_export_as_dicom_and_fhir(hub, mercy, study_200, tmp_path):
    from lxml import etree

    package = _send_small(study_200, tmp_path, mercy.env)
    xml = emix(
        "audit", "export", "--home", str(hub.home), "--format", "dicom", "--package", package
    ).stdout
    messages = [etree.fromstring(line.encode()) for line in xml.splitlines()]
    assert len(messages) >= 2 and all(m.tag == "AuditMessage" for m in messages)
    codes = {m.find("EventIdentification/EventID").get("csd-code") for m in messages}
    assert "110104" in codes
    fhir = emix(
        "audit", "export", "--home", str(hub.home), "--format", "fhir", "--package", package
    ).stdout.splitlines()
    import json

    assert all(json.loads(line)["resourceType"] == "AuditEvent" for line in fhir)
