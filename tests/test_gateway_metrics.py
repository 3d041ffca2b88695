"""Gateway queue depths on its Prometheus endpoint: what an operator's alert rules read."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import requests

from emix_core.gateway.inbound import SCHEMA
from emix_core.testing import free_port, make_sample_study

PATIENT_ID = "PID-METRICS-42"


def _depth(text: str, queue: str, state: str) -> float | None:
    pattern = rf'^emix_gateway_queue_depth\{{queue="{re.escape(queue)}",state="{state}"\}} (\S+)$'
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else None


def _seed_inbound(state_dir: Path) -> None:
    """The inbound journal as a crash or an outage leaves it: two packages still to
    receive (one failing), one received and waiting for its destination, one given up,
    three delivered."""
    state_dir.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(state_dir / "inbound.db")
    db.executescript(SCHEMA)
    now = time.time()
    rows = [
        ("a" * 32, "receiving", 0),
        ("b" * 32, "receiving", 3),
        ("c" * 32, "received", 0),
        ("d" * 32, "failed", 10),
        *[(f"{n}" * 32, "delivered", 0) for n in range(3)],
    ]
    db.executemany(
        "INSERT INTO packages (id, sender, state, attempts, next_attempt, seen) "
        "VALUES (?, 'mercy', ?, ?, ?, ?)",
        [(pid, state, attempts, now + 3600, now) for pid, state, attempts in rows],
    )
    db.execute(
        "INSERT INTO deliveries (package_id, destination, state, next_attempt) "
        "VALUES (?, 'inbox', 'pending', ?)",
        ("c" * 32, now + 3600),
    )
    db.commit()
    db.close()


@pytest.mark.e2e
def test_gateway_metrics_show_queue_depths_without_phi(tmp_path: Path) -> None:
    study = make_sample_study(tmp_path / "study", accession="ACC-MET-1", patient_id=PATIENT_ID)
    drop = tmp_path / "outbox" / "lakeside"
    drop.mkdir(parents=True)
    files = study.files[:3]
    for path in files:
        (drop / path.name).write_bytes(path.read_bytes())
    (tmp_path / "inbox").mkdir()
    _seed_inbound(tmp_path / "home" / "gateway")
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[gateway]\nhome = "home"\nhub_url = "http://127.0.0.1:{free_port()}"\n'
        f'token = "emix_unused"\nmetrics_port = {port}\npoll_seconds = 0.2\n'
        f"retry_max_seconds = 2\n\n"
        f'[[sources]]\nkind = "folder"\nname = "ct-drop"\npath = "outbox"\n'
        f'sent = "sent"\nfailed = "failed"\nsettle_seconds = 0\nfile_settle_seconds = 0.2\n\n'
        f'[[destinations]]\nkind = "folder"\nname = "inbox"\npath = "inbox"\n'
    )
    gateway = subprocess.Popen(
        [sys.executable, "-m", "emix_core", "gateway", "run", "--config", str(config),
         "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    text = ""
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except requests.RequestException:
                time.sleep(0.3)
                continue
            source = [_depth(text, "source:ct-drop", s) for s in ("pending", "in_flight")]
            if None not in source and sum(source) == len(files):  # type: ignore[arg-type]
                break
            time.sleep(0.3)
    finally:
        os.killpg(gateway.pid, signal.SIGTERM)
        gateway.wait(timeout=30)
    # the packages that arrived: 2 to receive and 1 to deliver, 1 given up, 1 retried
    assert _depth(text, "inbound", "pending") == 3.0, text
    assert _depth(text, "inbound", "in_flight") == 0.0
    assert _depth(text, "inbound", "failed") == 1.0
    assert _depth(text, "inbound", "retrying") == 1.0
    # the drop folder's files: the hub is down, so none is sent and none failed
    source = {s: _depth(text, "source:ct-drop", s) for s in ("pending", "in_flight", "failed")}
    assert source["pending"] + source["in_flight"] == len(files), source  # type: ignore[operator]
    assert source["failed"] == 0.0
    # no patient data, UID or file name in any label
    labels = " ".join(re.findall(r"\{[^}]*\}", text))
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    for secret in (PATIENT_ID, study.study_uid, first.SOPInstanceUID, files[0].name, "a" * 32):
        assert secret not in labels
