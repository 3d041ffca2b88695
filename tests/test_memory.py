"""Everything streams: memory stays flat whatever the study size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

LIMIT_KIB = 150 * 1024


def peak_rss_kib(*args: str, env: dict[str, str]) -> tuple[int, str]:
    """Run ``emix ARGS`` in a child and return its peak resident memory (KiB) and stdout."""
    code = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "sys.stderr.write(r.stderr)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "print(r.stdout)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, sys.executable, "-m", "emix_core", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=True,
    )
    peak, _, stdout = out.stdout.partition("\n")
    return int(peak), stdout


def hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


@pytest.fixture(scope="module")
def big_study(tmp_path_factory) -> Path:
    """600 slices of 512x512 16-bit noise (~315 MB) in 4 series."""
    from emix_core.content.samples import generate_study

    folder = tmp_path_factory.mktemp("big")
    generate_study(folder, slices=600, series=4)
    return folder


def test_send_hub_and_receive_stay_under_150_mib_for_a_315_mb_study(
    hub, mercy, lakeside, big_study, tmp_path
):
    size = sum(p.stat().st_size for p in big_study.rglob("*") if p.is_file())
    assert size > 300e6
    send_peak, out = peak_rss_kib(
        "send", str(big_study), "--to", "lakeside", "--json", env=mercy.env
    )
    package = json.loads(out)["package"]
    receive_peak, _ = peak_rss_kib(
        "receive", package, "--out", str(tmp_path / "in"), "--json", env=lakeside.env
    )
    hub_peaks = [hwm_kib(pid) for pid in hub.worker_pids()]
    assert send_peak < LIMIT_KIB, f"emix send peaked at {send_peak // 1024} MiB"
    assert receive_peak < LIMIT_KIB, f"emix receive peaked at {receive_peak // 1024} MiB"
    assert max(hub_peaks) < LIMIT_KIB, f"hub peaked at {max(hub_peaks) // 1024} MiB"
    received = sum(p.stat().st_size for p in (tmp_path / "in" / package).rglob("*.dcm"))
    assert received == size
