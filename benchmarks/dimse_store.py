"""C-STORE into ``emix dimse listen`` against C-STORE into Orthanc: same files, same run.

    .venv/bin/python benchmarks/dimse_store.py --slices 200 1000 --reps 3

dcmtk's ``storescu`` sends a generated CT study (512x512, 16-bit, uncompressible noise)
over loopback, once to Orthanc's DICOM server and once to an emix listener, each time
into an empty receiver; the time is storescu's wall time, from connect to the last
C-STORE response. TCP_NODELAY is set everywhere (storescu and Orthanc through dcmtk's
``TCP_NODELAY`` variable; emix sets it itself). The emix listener keeps
every instance on disk (fsync) before it answers; its hub is unreachable here, so the
sending that follows is not measured. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from emix_core import generate_study  # noqa: E402
from emix_core.testing import Orthanc, free_port  # noqa: E402

#: the largest PDU Orthanc 1.10 accepts (its default is 16384)
ORTHANC_MAX_PDU = 131072
#: the listener's maximum PDU: Orthanc's, and emix's default
PDU_SIZES = tuple(int(n) for n in os.environ.get("BENCH_PDU_SIZES", "131072 262144").split())


def storescu(port: int, called: str, folder: Path) -> float:
    env = dict(os.environ)
    started = time.perf_counter()
    subprocess.run(
        [
            "storescu",
            "-aet",
            "BENCH",
            "-aec",
            called,
            "+sd",
            "+r",
            "127.0.0.1",
            str(port),
            str(folder),
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    return time.perf_counter() - started


def hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def emix_listener(work: Path, max_pdu: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    log = open(work / "listen.log", "wb")  # noqa: SIM115 - owned by the child
    env = {
        **os.environ,
        "EMIX_HOME": str(work / "home"),
        "EMIX_HUB_URL": "http://127.0.0.1:9",
        "EMIX_TOKEN": "emx_offline",
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "emix_core",
            "dimse",
            "listen",
            "--ae-title",
            "EMIX",
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--to",
            "lakeside",
            "--settle",
            "3600",
            "--max-pdu",
            str(max_pdu),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while b"dimse.listener.started" not in (work / "listen.log").read_bytes():
        if time.monotonic() > deadline or process.poll() is not None:
            raise SystemExit((work / "listen.log").read_text())
        time.sleep(0.1)
    return process, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[200])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    # dcmtk (storescu, and Orthanc's DICOM stack) disables Nagle's algorithm only when told
    os.environ["TCP_NODELAY"] = "1"
    if not shutil.which("storescu"):
        raise SystemExit("needs dcmtk: apt-get install dcmtk")
    results = []
    with tempfile.TemporaryDirectory(prefix="emix-dimse-bench-") as tmp:
        root = Path(tmp)
        pacs = Orthanc(
            root / "orthanc", dicom=True, aet="ORTHANC", extra={"MaximumPduLength": ORTHANC_MAX_PDU}
        )
        pacs.start()
        try:
            for slices in args.slices:
                study = root / f"study-{slices}"
                generate_study(
                    study,
                    slices=slices,
                    series=1,
                    patient_name="BENCH^DIMSE",
                    patient_id="BENCH-1",
                    accession_number="BENCH-1",
                )
                size = sum(p.stat().st_size for p in study.rglob("*.dcm"))
                orthanc_times: list[float] = []
                emix_times: dict[int, list[float]] = {pdu: [] for pdu in PDU_SIZES}
                memory: list[float] = []
                for rep in range(args.reps):
                    for study_id in pacs.get("/studies").json():  # an empty receiver
                        requests.delete(f"{pacs.base}/studies/{study_id}", timeout=60)
                    orthanc_times.append(storescu(pacs.dicom_port, "ORTHANC", study))
                    for pdu in PDU_SIZES:
                        work = root / f"emix-{slices}-{rep}-{pdu}"
                        work.mkdir()
                        process, port = emix_listener(work, pdu)
                        try:
                            emix_times[pdu].append(storescu(port, "EMIX", study))
                            memory.append(hwm_mib(process.pid))
                        finally:
                            os.killpg(process.pid, signal.SIGTERM)
                            process.wait(timeout=60)
                            shutil.rmtree(work, ignore_errors=True)
                orthanc = statistics.median(orthanc_times)
                row = {
                    "slices": slices,
                    "megabytes": round(size / 1e6, 1),
                    "runs": args.reps,
                    "orthanc_seconds": round(orthanc, 3),
                    "orthanc_mb_s": round(size / 1e6 / orthanc, 1),
                    "emix_peak_mib": round(max(memory), 1),
                }
                line = f"{slices:5d} slices {row['megabytes']:7.1f} MB   "
                line += f"Orthanc {size / 1e6 / orthanc:6.1f} MB/s"
                for pdu, times in emix_times.items():
                    median = statistics.median(times)
                    row[f"emix_seconds_pdu_{pdu}"] = round(median, 3)
                    row[f"emix_mb_s_pdu_{pdu}"] = round(size / 1e6 / median, 1)
                    line += (
                        f"   emix (max PDU {pdu}) {size / 1e6 / median:6.1f} MB/s "
                        f"= {orthanc / median:.2f}x Orthanc"
                    )
                results.append(row)
                print(line + f"   emix peak {row['emix_peak_mib']} MiB", flush=True)
        finally:
            pacs.stop()
    out = ROOT / "benchmarks" / "dimse_results.json"
    out.write_text(json.dumps({"c_store": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
