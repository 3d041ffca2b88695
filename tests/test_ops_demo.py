"""The demo prints commands that work as printed, and none for a hub that stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emix_core.testing import emix, free_port


@pytest.mark.e2e
def test_demo_commands_work_as_printed_from_a_plain_shell(tmp_path: Path) -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "emix_core", "demo", "--home", str(tmp_path / "demo"),
         "--port", str(free_port()), "--slices", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert demo.stdout is not None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = demo.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
            if "plugins" in line and lines[-2].lstrip().startswith(("emix", "/")):
                break
        inbox = next(ln.strip() for ln in lines if " inbox --home " in ln)
        # a shell without the venv on PATH, as a new terminal has
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "EMIX_HOME")}
        env["PATH"] = "/usr/bin:/bin"
        run = subprocess.run(
            inbox, shell=True, env=env, capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, (inbox, run.stderr)
        assert "mercy-general" in run.stdout or "inbox is empty" in run.stdout
    finally:
        os.killpg(demo.pid, signal.SIGINT)
        demo.wait(timeout=60)


@pytest.mark.e2e
def test_demo_with_exit_prints_no_commands_for_a_stopped_hub(tmp_path: Path) -> None:
    result = emix(
        "demo", "--home", str(tmp_path / "demo"), "--port", str(free_port()), "--slices", "4",
        "--exit",
    )  # fmt: skip
    assert "stop now (--exit)" in result.stdout
    assert " inbox --home " not in result.stdout
    # 4 slices and the report, counted from the signed manifest (not the DICOMDIR's links)
    assert "(5 items and a DICOMDIR)" in result.stdout
