"""deploy/: the systemd units pass `systemd-analyze verify`; hub logs carry time and level."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from emix_core.testing import emix, free_port

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
UNITS = ["emix-hub.service", "emix-gateway@.service"]
HARDENING = [
    "User=emix",
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "StateDirectory=emix/",
    "LogsDirectory=emix",
    "CapabilityBoundingSet=",
]


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is missing (Debian package systemd, in .ci/system-deps)")
    return found


@pytest.mark.parametrize("unit", UNITS)
def test_units_are_hardened(unit: str) -> None:
    text = (DEPLOY / "systemd" / unit).read_text()
    for line in HARDENING:
        assert f"\n{line}" in text, line


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = systemd_analyze()
    emix_bin = Path(sys.executable).parent / "emix"
    assert emix_bin.exists()
    names = []
    for unit in UNITS:
        text = (DEPLOY / "systemd" / unit).read_text()
        text = text.replace("/opt/emix/venv/bin/emix", str(emix_bin))
        name = unit.replace("@.", "@mercy.")
        (tmp_path / name).write_text(text)
        names.append(str(tmp_path / name))
    result = subprocess.run([analyze, "verify", *names], capture_output=True, text=True)
    # unknown keys and bad values are only warnings: any line about our units fails
    ours = [ln for ln in result.stderr.splitlines() if "emix-" in ln]
    assert result.returncode == 0 and not ours, result.stderr
    # and the check does catch a mistake
    bad = tmp_path / "emix-bad.service"
    bad.write_text(
        Path(names[0]).read_text().replace("ProtectSystem=strict", "ProtectSystem=strikt")
    )
    caught = subprocess.run([analyze, "verify", str(bad)], capture_output=True, text=True)
    assert "strikt" in caught.stderr


def test_units_commands_exist_in_the_cli() -> None:
    """Every option the units pass is one the installed emix accepts."""
    assert "--log-format" in emix("hub", "serve", "--help").stdout
    assert "--log-format" in emix("gateway", "run", "--help").stdout


@pytest.mark.e2e
def test_hub_logs_json_lines_with_time_and_level_and_no_poll_noise(tmp_path: Path) -> None:
    home, port = tmp_path / "hub", free_port()
    emix("hub", "init", "--home", str(home), "--port", str(port))
    log = tmp_path / "hub.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "emix_core", "hub", "serve", "--home", str(home),
             "--port", str(port), "--log-format", "json", "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok:
                        break
                except requests.RequestException:
                    time.sleep(0.2)
            for _ in range(5):
                requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
            requests.get(f"http://127.0.0.1:{port}/api/v1/hub", timeout=5)
            time.sleep(0.5)
        finally:
            import os

            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert lines and all({"time", "level", "event"} <= set(line) for line in lines)
    events = [line["event"] for line in lines]
    assert any('"GET /api/v1/hub" 200' in e for e in events)
    assert not any("/healthz" in e for e in events), "polls are logged only at debug"


@pytest.mark.e2e
def test_gateway_metrics_on_loopback_and_log_level(tmp_path: Path) -> None:
    import os

    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[gateway]\nhome = "home"\nhub_url = "http://127.0.0.1:{free_port()}"\n'
        f'token = "emix_unused"\nmetrics_port = {port}\n'
    )
    log = tmp_path / "gateway.log"
    with open(log, "wb") as out:
        gateway = subprocess.Popen(
            [sys.executable, "-m", "emix_core", "gateway", "run", "--config", str(config),
             "--log-format", "json", "--log-level", "warning"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        try:
            text = ""
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and "gateway.started" not in text:
                try:
                    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
                except requests.RequestException:
                    time.sleep(0.3)
        finally:
            os.killpg(gateway.pid, signal.SIGTERM)
            gateway.wait(timeout=30)
    assert 'emix_gateway_events_total{event="gateway.started",level="info"} 1.0' in text
    # --log-level warning: the info event is counted, not logged
    assert "gateway.started" not in log.read_text()
