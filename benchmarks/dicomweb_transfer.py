"""PACS → hub → PACS through emix, against a direct STOW-RS of the same files into Orthanc.

    .venv/bin/python benchmarks/dicomweb_transfer.py --slices 200 1000

For each size: a generated CT study (512x512, 16-bit, 3 series) is loaded into a first
Orthanc; then (a) a plain STOW-RS client stores the same files into a fresh Orthanc
(batches of 32 MB, one and two requests at a time: the faster counts), and (b) emix moves
the study: ``emix dicomweb send`` from the first Orthanc to the hub, then ``emix dicomweb
deliver`` from the hub into another fresh Orthanc. Peak memory (maximum resident set)
is measured for each emix process, and for the hub's gunicorn processes.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emix_dicomweb.multipart import MultipartBody  # noqa: E402

from benchmarks.run import run_emix  # noqa: E402
from emix_core.testing import (  # noqa: E402
    Orthanc,  # noqa: E402
    make_hub,
    side,
)


def direct_stow(pacs: Orthanc, files: list[Path], parallel: int) -> float:
    """A plain STOW-RS client: 32 MB batches, ``parallel`` requests at a time."""
    batches: list[list[Path]] = [[]]
    size = 0
    for path in files:
        if batches[-1] and size + path.stat().st_size > 32 * 1024 * 1024:
            batches.append([])
            size = 0
        batches[-1].append(path)
        size += path.stat().st_size

    def post(batch: list[Path]) -> None:
        body = MultipartBody(batch)
        answer = requests.post(
            f"{pacs.url}/studies",
            data=body,
            headers={"Content-Type": body.content_type, "Accept": "application/dicom+json"},
            timeout=600,
        )
        answer.raise_for_status()

    started = time.monotonic()
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(post, batches))
    return time.monotonic() - started


def peak_rss_kib(pids: list[int]) -> dict[int, int]:
    out = {}
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    out[pid] = int(line.split()[1])
        except OSError:
            pass
    return out


def bench(slices: int, work: Path) -> dict:
    from emix_core.content.samples import generate_study

    work = work / f"run-{slices}"  # facility homes pin one hub's keys: one set per run
    study_dir = work / f"study-{slices}"
    files = generate_study(study_dir, slices=slices, series=3, accession_number=f"BENCH{slices}")
    total = sum(p.stat().st_size for p in files)
    source = Orthanc(work / f"pacs-src-{slices}").start()
    targets: list[Orthanc] = []
    hub = None
    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(source.upload, files))
        direct = {}
        for parallel in (1, 2):
            target = Orthanc(work / f"pacs-direct-{slices}-{parallel}").start()
            targets.append(target)
            direct[parallel] = direct_stow(target, files, parallel)
        hub = make_hub(work / f"hub-{slices}")
        hub.add_facility("Mercy", "a@mercy.example.org", "mercy")
        hub.add_facility("Lakeside", "a@lakeside.example.org", "lakeside")
        mercy, lakeside = side(work, hub, "mercy"), side(work, hub, "lakeside")
        send_s, send_rss, out = run_emix(
            [
                "dicomweb",
                "send",
                "--pacs",
                source.url,
                "--accession",
                f"BENCH{slices}",
                "--to",
                "lakeside",
                "--json",
            ],
            mercy.env,
        )
        package = json.loads(out)["package"]
        target = Orthanc(work / f"pacs-emix-{slices}").start()
        targets.append(target)
        deliver_s, deliver_rss, out = run_emix(
            ["dicomweb", "deliver", package, "--pacs", target.url, "--json"], lakeside.env
        )
        delivered = json.loads(out)
        assert delivered["stored"] == slices, delivered
        hub_rss = peak_rss_kib(hub.worker_pids())
        return {
            "slices": slices,
            "mb": round(total / 1e6, 1),
            "direct_stow_s": {k: round(v, 2) for k, v in direct.items()},
            "emix_send_s": round(send_s, 2),
            "emix_deliver_s": round(deliver_s, 2),
            "emix_total_s": round(send_s + deliver_s, 2),
            "ratio_vs_best_direct": round((send_s + deliver_s) / min(direct.values()), 2),
            "deliver_stow_s": delivered["seconds"],
            "peak_rss_mib": {
                "send": round(send_rss, 1),
                "deliver": round(deliver_rss, 1),
                "hub_processes": sorted(round(v / 1024, 1) for v in hub_rss.values()),
            },
        }
    finally:
        if hub is not None:
            hub.stop()
        for pacs in [source, *targets]:
            pacs.stop(wait=False)
        for pacs in [source, *targets]:
            pacs.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[200, 1000])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="emix-dicomweb-bench-") as folder:
        for slices in args.slices:
            print(json.dumps(bench(slices, Path(folder))), flush=True)


if __name__ == "__main__":
    main()
