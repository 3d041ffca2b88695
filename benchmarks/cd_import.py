"""How long ``emix cd inspect`` and ``emix cd import`` take on a disc, and peak memory.

    .venv/bin/python benchmarks/cd_import.py                 # 1000 instances
    .venv/bin/python benchmarks/cd_import.py --slices 300 --pacs

Generates a CT study (512x512, 16-bit, 3 series), writes it as an IHE PDI disc image
with emix's own writer (the ``emix cd export`` path), starts a hub with two facilities
on loopback, then measures, each command in a fresh process (peak memory is that
process's maximum resident set size):

1. ``emix_core.write_pdi_iso`` (in this process: time, and memory growth);
2. ``emix cd inspect disc.iso`` (reads the DICOMDIR and checks every file's header);
3. ``emix cd import disc.iso --to lakeside`` (checks, stages, sends through the hub);
4. ``emix send FOLDER --to lakeside`` of the same files, for comparison;
5. with ``--pacs``: ``emix cd import disc.iso --pacs`` into an Orthanc on loopback.

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emix_core import Item, generate_study, write_pdi_iso  # noqa: E402
from emix_core.testing import Orthanc, make_hub, side  # noqa: E402


def peak_of(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``emix ARGS`` under a small launcher: wall time, the command's own peak RSS
    (MiB), its JSON output."""
    code = (
        "import os, resource, subprocess, sys, time, json\n"
        "t = time.monotonic()\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True)\n"
        "s = time.monotonic() - t\n"
        "r = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "sys.stderr.buffer.write(p.stderr)\n"
        "print(json.dumps({'rc': p.returncode, 'seconds': s, 'kib': r,"
        " 'out': p.stdout.decode()}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, sys.executable, "-m", "emix_core", *args],
        capture_output=True,
        env={**os.environ, **env},
        check=True,
    )
    data = json.loads(done.stdout)
    if data["rc"] != 0:
        raise SystemExit(f"emix {' '.join(args)} failed ({data['rc']}):\n{done.stderr.decode()}")
    out = data["out"].strip()
    return {
        "seconds": round(data["seconds"], 2),
        "peak_mib": round(data["kib"] / 1024, 1),
        "output": json.loads(out) if out.startswith("{") else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=1000)
    parser.add_argument("--pacs", action="store_true", help="also import into an Orthanc")
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="emix-bench-cd-"))
    study = work / "study"
    print(f"generating {options.slices} slices in {work} ...", flush=True)
    files = generate_study(study, slices=options.slices, series=3, seed=1)
    size = sum(p.stat().st_size for p in files)

    entries = [
        (
            Item(
                id=n, name=p.name, media_type="application/dicom", size=p.stat().st_size, sha256=""
            ),
            lambda p=p: open(p, "rb"),  # noqa: SIM115 - closed by the writer
        )
        for n, p in enumerate(files, start=1)
    ]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    iso = work / "disc.iso"
    with open(iso, "wb") as sink:
        write_pdi_iso(entries, sink, volume_id="BENCH")
    results: dict[str, Any] = {
        "instances": len(files),
        "study_mb": round(size / 1e6, 1),
        "iso_mb": round(iso.stat().st_size / 1e6, 1),
        "write_pdi_iso": {
            "seconds": round(time.monotonic() - started, 2),
            "peak_growth_mib": round(
                (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, 1
            ),
        },
    }
    hub = make_hub(work)
    try:
        hub.add_facility("Mercy General", "admin@mercy.example.org", "mercy")
        hub.add_facility("Lakeside Imaging", "it@lakeside.example.org", "lakeside")
        mercy = side(work, hub, "mercy")
        results["inspect"] = peak_of(["cd", "inspect", str(iso), "--json"], mercy.env)
        results["inspect"]["output"] = results["inspect"]["output"]["counts"]
        results["import_to_hub"] = peak_of(
            ["cd", "import", str(iso), "--to", "lakeside", "--json"], mercy.env
        )
        results["import_to_hub"]["output"] = {
            k: results["import_to_hub"]["output"][k] for k in ("imported", "package")
        }
        results["send_folder"] = peak_of(
            ["send", str(study), "--to", "lakeside", "--json"], mercy.env
        )
        results["send_folder"]["output"] = None
        if options.pacs:
            pacs = Orthanc(work / "orthanc").start()
            try:
                results["import_to_pacs"] = peak_of(
                    ["cd", "import", str(iso), "--pacs", pacs.url, "--json"], mercy.env
                )
                results["import_to_pacs"]["output"] = results["import_to_pacs"]["output"]["pacs"]
            finally:
                pacs.stop()
    finally:
        hub.stop()
    for name in ("inspect", "import_to_hub", "send_folder", "import_to_pacs"):
        if name in results:
            r = results[name]
            print(f"{name:15s} {r['seconds']:7.2f} s   peak {r['peak_mib']:6.1f} MiB")
    w = results["write_pdi_iso"]
    print(f"{'write_pdi_iso':15s} {w['seconds']:7.2f} s   growth {w['peak_growth_mib']:6.1f} MiB")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
