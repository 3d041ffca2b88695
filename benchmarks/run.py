"""emix side by side with Orthanc on the same studies, in one run.

    make bench                         # full: 10, 200 and 1000 slices, 3 repetitions
    .venv/bin/python benchmarks/run.py --quick     # 10, 50 and 200 slices, 1 repetition

Measures (median, min, max of the repetitions) and prints the ratios emix/Orthanc:

1. hub ingest: ``emix send`` against STOW-RS into Orthanc (plain requests, and
   dicomweb-client), same files;
2. end to end: last file landed in A's outbox (less the settle time) → last instance
   stored in B's PACS through both gateways, against a direct STOW-RS (dicomweb-client,
   50 instances a request);
3. download: the package zip against Orthanc's study archive; WADO-RS from the hub's
   DICOMweb endpoint against Orthanc's, raw and parsed by dicomweb-client;
4. peak memory (VmHWM) of each emix process and of Orthanc, per study size;
5. latency: a 10-slice study from settled in A's outbox to listed in B's inbox;
6. C-STORE (dcmtk's storescu, TCP_NODELAY) into ``emix dimse listen`` against C-STORE
   into Orthanc's DICOM server, same files, each into an empty receiver;
and, as the machine's physical limits, a disk copy and AES-256-GCM throughput.

When run as root with ``unshare`` available, the whole run happens in a private network
namespace whose only interface is loopback. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from benchmarks.dimse_store import ORTHANC_MAX_PDU, emix_listener, storescu  # noqa: E402
from emix_core.testing import (  # noqa: E402
    HubProcess,
    Orthanc,  # noqa: E402
    make_hub,
    side,
)

SETTLE = 1.0  # the gateway's settle_seconds in this benchmark
#: What ``--only`` can pick (default: all of them).
MEASURES = ("ingest", "c-store", "download", "end-to-end", "latency")
ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'


# --------------------------------------------------------------------------- helpers
def stats(samples: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "runs": len(samples),
    }


def repeat(
    times: int, action: Callable[[], float], before: Callable[[], None] | None = None
) -> dict[str, float]:
    samples = []
    for _ in range(times):
        if before:
            before()
        samples.append(action())
    return stats(samples)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process (and its waited-for children) used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def hwm_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


#: Runs a command and prints its peak RSS. A small wrapper is needed: a child forked
#: (or vforked) from this large process would report this process's peak as its own.
_PEAK_WRAPPER = (
    "import resource, subprocess, sys\n"
    "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "sys.stderr.write(r.stderr)\n"
    "sys.stdout.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) + '\\n')\n"
    "sys.stdout.write(r.stdout)\n"
    "sys.exit(r.returncode)\n"
)


def run_emix(args: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Run an emix command: (wall seconds, its peak RSS in MiB, its stdout)."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_WRAPPER, sys.executable, "-m", "emix_core", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"emix {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    peak, _, out = done.stdout.partition("\n")
    return seconds, int(peak) / 1024, out


def stream_to_null(response: requests.Response) -> int:
    total = 0
    for chunk in response.iter_content(1 << 20):
        total += len(chunk)
    return total


def orthanc_clear(pacs: Orthanc) -> None:
    for study in pacs.get("/studies").json():
        requests.delete(f"{pacs.base}/studies/{study}", timeout=60)


def orthanc_count(pacs: Orthanc) -> int:
    return pacs.get("/statistics").json()["CountInstances"]


def stow_requests(pacs: Orthanc, files: list[Path], per_request: int = 50) -> float:
    """Plain requests: multipart/related bodies of 50 instances, one request at a time."""
    from emix_dicomweb.multipart import MultipartBody

    started = time.monotonic()
    for i in range(0, len(files), per_request):
        body = MultipartBody(files[i : i + per_request])
        answer = requests.post(
            f"{pacs.url}/studies",
            data=body,
            timeout=600,
            headers={"Content-Type": body.content_type, "Accept": "application/dicom+json"},
        )
        answer.raise_for_status()
    return time.monotonic() - started


def stow_dicomweb_client(pacs: Orthanc, files: list[Path], per_request: int = 50) -> float:
    """dicomweb-client's store_instances, 50 instances a request."""
    import pydicom
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(pacs.url)
    started = time.monotonic()
    for i in range(0, len(files), per_request):
        client.store_instances([pydicom.dcmread(p) for p in files[i : i + per_request]])
    return time.monotonic() - started


# --------------------------------------------------------------------------- the run
class Bench:
    def __init__(self, work: Path, reps: int, only: set[str] | None = None) -> None:
        self.work = work
        self.reps = reps
        self.only = only or set(MEASURES)
        self.results: dict[str, Any] = {"machine": machine(), "sizes": {}}
        # the direct-STOW and C-STORE reference
        self.pacs_a = Orthanc(
            work / "pacs-a", dicom=True, aet="ORTHANC", extra={"MaximumPduLength": ORTHANC_MAX_PDU}
        ).start()
        self.pacs_b = Orthanc(work / "pacs-b").start()  # B's PACS, fed by B's gateway
        self.hub: HubProcess = make_hub(work)
        self.hub.add_facility("Mercy General", "a@mercy.example.org", "mercy")
        self.hub.add_facility("Lakeside Imaging", "b@lakeside.example.org", "lakeside")
        self.mercy = side(work, self.hub, "mercy")
        self.lakeside = side(work, self.hub, "lakeside")
        self.gateways: dict[str, subprocess.Popen] = {}
        self.packages: list[str] = []  # packages sent by the ingest measure

    def stop_gateways(self) -> None:
        for process in self.gateways.values():
            process.terminate()
        for process in self.gateways.values():
            process.wait(timeout=30)
        self.gateways.clear()

    def close(self) -> None:
        self.stop_gateways()
        self.hub.stop()
        for pacs in (self.pacs_a, self.pacs_b):
            pacs.stop(wait=False)
        for pacs in (self.pacs_a, self.pacs_b):
            pacs.stop()

    def c_store(self, study: Path) -> tuple[dict[str, float], dict[str, float]]:
        """storescu of the study into a new emix listener, then into an emptied Orthanc."""
        emix_times: list[float] = []
        orthanc_times: list[float] = []
        for rep in range(self.reps):
            work = self.work / f"listener-{study.name}-{rep}"
            work.mkdir()
            process, port = emix_listener(work, 262144)
            try:
                emix_times.append(storescu(port, "EMIX", study))
            finally:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=60)
                shutil.rmtree(work, ignore_errors=True)
            orthanc_clear(self.pacs_a)
            orthanc_times.append(storescu(self.pacs_a.dicom_port, "ORTHANC", study))
        return stats(emix_times), stats(orthanc_times)

    # ------------------------------------------------------------------ gateways
    def start_gateways(self, progressive: bool = True) -> None:
        """(Re)start both gateways; ``progressive`` is their ``[gateway] progressive``."""
        self.stop_gateways()
        a, b = self.work / "site-a", self.work / "site-b"
        for folder in ("outbox/lakeside", "sent", "failed"):
            (a / folder).mkdir(parents=True, exist_ok=True)
        (b / "failed").mkdir(parents=True, exist_ok=True)
        (a / "gateway.toml").write_text(f"""
[gateway]
home = "{self.mercy.home}"
hub_url = "{self.hub.url}"
token = "{self.mercy.token}"
poll_seconds = 0.2
progressive = {"true" if progressive else "false"}

[[sources]]
kind = "folder"
name = "outbox"
path = "{a / "outbox"}"
sent = "{a / "sent"}"
failed = "{a / "failed"}"
after_send = "delete"
settle_seconds = {SETTLE}
file_settle_seconds = 0.5
""")
        (b / "gateway.toml").write_text(f"""
[gateway]
home = "{self.lakeside.home}"
hub_url = "{self.hub.url}"
token = "{self.lakeside.token}"
poll_seconds = 0.2
progressive = {"true" if progressive else "false"}

[[destinations]]
kind = "dicomweb"
name = "pacs"
url = "{self.pacs_b.url}"
""")
        for name, folder in (("a", a), ("b", b)):
            log = open(folder / "gateway.log", "ab")  # noqa: SIM115
            self.gateways[name] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "emix_core",
                    "gateway",
                    "run",
                    "--config",
                    str(folder / "gateway.toml"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        time.sleep(2)

    def cpu_by_process(self) -> dict[str, float]:
        """CPU seconds used so far by the hub's processes, each gateway and B's PACS."""
        return {
            "hub": sum(cpu_seconds(p) for p in self.hub.worker_pids()),
            "gateway_a": cpu_seconds(self.gateways["a"].pid),
            "gateway_b": cpu_seconds(self.gateways["b"].pid),
            "pacs_b": cpu_seconds(self.pacs_b.process.pid),
        }

    def wait_receiving_gateway_idle(self, timeout: float = 120) -> None:
        """Until B's gateway finished every package (its last steps, receipt and the check
        of the PACS, may follow the last instance stored)."""
        import sqlite3

        journal = Path(self.lakeside.home) / "gateway" / "inbound.db"
        deadline = time.monotonic() + timeout
        while journal.exists() and time.monotonic() < deadline:
            with contextlib.closing(sqlite3.connect(journal, timeout=30)) as db:
                busy = db.execute(
                    "SELECT COUNT(*) FROM packages WHERE state IN ('receiving', 'received')"
                ).fetchone()[0]
            if not busy:
                return
            time.sleep(0.1)

    def drop(self, files: list[Path], study: Path) -> float:
        """Drop a study into A's outbox as a PACS export would (write, then rename)."""
        outbox = self.work / "site-a" / "outbox" / "lakeside" / f"drop-{time.monotonic_ns()}"
        outbox.mkdir(parents=True)
        for path in files:
            target = outbox / path.relative_to(study).as_posix().replace("/", "-")
            part = target.with_name("." + target.name + ".part")
            shutil.copyfile(path, part)
            os.rename(part, target)
        return time.monotonic()

    # ------------------------------------------------------------------ measurements
    def size(self, slices: int) -> None:
        from emix_core.content.samples import generate_study

        study = self.work / f"study-{slices}"
        files = sorted(
            generate_study(
                study, slices=slices, series=3, seed=slices, accession_number=f"BENCH{slices}"
            )
        )
        size_mb = sum(p.stat().st_size for p in files) / 1e6
        row: dict[str, Any] = {"slices": slices, "mb": round(size_mb, 1)}
        print(f"\n== {slices} slices, {size_mb:.0f} MB", flush=True)
        send_peaks: list[float] = []
        if self.only & {"ingest", "download"}:
            self.ingest(row, study, files, send_peaks)
        if "c-store" in self.only:
            self.c_store_row(row, study)
        if "download" in self.only:
            self.download(row, files)
        if "end-to-end" in self.only:
            self.end_to_end(row, slices, files)
        self.memory(row, send_peaks)
        self.results["sizes"][str(slices)] = row

    def ingest(
        self, row: dict[str, Any], study: Path, files: list[Path], send_peaks: list[float]
    ) -> None:
        """1. ``emix send`` against STOW-RS into Orthanc."""
        sends: list[float] = []
        packages = self.packages

        def emix_send() -> float:
            _wall, peak, out = run_emix(
                ["send", str(study), "--to", "lakeside", "--json"], self.mercy.env
            )
            body = json.loads(out)
            packages.append(body["package"])
            send_peaks.append(peak)
            sends.append(body["seconds"])
            return body["seconds"]

        row["ingest_emix_s"] = repeat(self.reps, emix_send)
        row["ingest_orthanc_requests_s"] = repeat(
            self.reps,
            lambda: stow_requests(self.pacs_a, files),
            before=lambda: orthanc_clear(self.pacs_a),
        )
        row["ingest_orthanc_dicomweb_client_s"] = repeat(
            self.reps,
            lambda: stow_dicomweb_client(self.pacs_a, files),
            before=lambda: orthanc_clear(self.pacs_a),
        )
        row["ingest_load_average"] = round(os.getloadavg()[0], 2)
        print(
            f"  ingest   emix {row['ingest_emix_s']['median']:.2f} s  orthanc "
            f"{row['ingest_orthanc_requests_s']['median']:.2f} s  dicomweb-client "
            f"{row['ingest_orthanc_dicomweb_client_s']['median']:.2f} s  (load average "
            f"{row['ingest_load_average']:.2f})",
            flush=True,
        )

    def c_store_row(self, row: dict[str, Any], study: Path) -> None:
        """6. C-STORE into the listener and into Orthanc."""
        row["c_store_emix_s"], row["c_store_orthanc_s"] = self.c_store(study)
        print(
            f"  c-store  emix {row['c_store_emix_s']['median']:.2f} s  orthanc "
            f"{row['c_store_orthanc_s']['median']:.2f} s",
            flush=True,
        )

    def download(self, row: dict[str, Any], files: list[Path]) -> None:
        """3. download: the study is in the hub (ingest) and in Orthanc A."""
        if not orthanc_count(self.pacs_a):
            stow_requests(self.pacs_a, files)
        package = self.packages[-1]
        token = {"Authorization": f"Bearer {self.lakeside.token}"}
        orthanc_study = self.pacs_a.get("/studies").json()[0]
        import pydicom

        study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        hub_web = f"{self.hub.url}/api/v1/packages/{package}/dicomweb"

        def timed(get: Callable[[], requests.Response]) -> float:
            started = time.monotonic()
            stream_to_null(get())
            return time.monotonic() - started

        row["zip_emix_s"] = repeat(
            self.reps,
            lambda: timed(
                lambda: requests.get(
                    f"{self.hub.url}/api/v1/packages/{package}/zip", headers=token, stream=True
                )
            ),
        )
        row["zip_orthanc_s"] = repeat(
            self.reps,
            lambda: timed(
                lambda: self.pacs_a.get(f"/studies/{orthanc_study}/archive", stream=True)
            ),
        )
        row["wado_raw_emix_s"] = repeat(
            self.reps,
            lambda: timed(
                lambda: requests.get(
                    f"{hub_web}/studies/{study_uid}",
                    stream=True,
                    headers={**token, "Accept": ACCEPT_DICOM},
                )
            ),
        )
        row["wado_raw_orthanc_s"] = repeat(
            self.reps,
            lambda: timed(
                lambda: self.pacs_a.get(
                    f"/dicom-web/studies/{study_uid}", stream=True, headers={"Accept": ACCEPT_DICOM}
                )
            ),
        )
        row["wado_parsed_emix_s"] = repeat(self.reps, lambda: parsed(hub_web, study_uid, token))
        row["wado_parsed_orthanc_s"] = repeat(
            self.reps, lambda: parsed(self.pacs_a.url, study_uid, {})
        )
        print(
            f"  zip      emix {row['zip_emix_s']['median']:.2f} s  orthanc "
            f"{row['zip_orthanc_s']['median']:.2f} s",
            flush=True,
        )

    def end_to_end(self, row: dict[str, Any], slices: int, files: list[Path]) -> None:
        """2. end to end through both gateways, against a direct STOW into the same PACS."""
        from emix_core.content.samples import generate_study

        fresh: list[tuple[list[Path], Path]] = []

        def new_copy() -> None:
            """A new study of the same size (the gateway sends an instance only once)."""
            self.wait_receiving_gateway_idle()
            orthanc_clear(self.pacs_b)
            folder = self.work / f"e2e-{slices}-{len(fresh)}"
            fresh.append((sorted(generate_study(folder, slices=slices, series=3)), folder))

        cpu: list[dict[str, float]] = []

        def end_to_end() -> float:
            files, study = fresh[-1]
            before = self.cpu_by_process()
            landed = self.drop(files, study)
            deadline = landed + 600
            while orthanc_count(self.pacs_b) < slices and time.monotonic() < deadline:
                time.sleep(0.02)
            seconds = time.monotonic() - landed - SETTLE
            self.wait_receiving_gateway_idle()
            after = self.cpu_by_process()
            cpu.append({k: round(after[k] - before[k], 2) for k in after})
            return seconds

        # first as before progressive packages (each stage waits for the one before)
        self.start_gateways(progressive=False)
        row["e2e_emix_whole_s"] = repeat(self.reps, end_to_end, before=new_copy)
        row["e2e_cpu_seconds_whole"], cpu[:] = list(cpu), []
        self.start_gateways(progressive=True)
        row["e2e_emix_s"] = repeat(self.reps, end_to_end, before=new_copy)
        row["e2e_direct_stow_s"] = repeat(
            self.reps,
            lambda: stow_dicomweb_client(self.pacs_b, files),
            before=lambda: orthanc_clear(self.pacs_b),
        )
        row["e2e_cpu_seconds"] = cpu  # per run, drop to done, each process
        row["e2e_load_average"] = round(os.getloadavg()[0], 2)
        print(
            f"  e2e      emix {row['e2e_emix_s']['median']:.2f} s (whole packages "
            f"{row['e2e_emix_whole_s']['median']:.2f} s)  direct "
            f"{row['e2e_direct_stow_s']['median']:.2f} s  (load average "
            f"{row['e2e_load_average']})\n  e2e CPU seconds per process: {cpu}",
            flush=True,
        )

    def memory(self, row: dict[str, Any], send_peaks: list[float]) -> None:
        """4. peak memory of each process, after this size."""
        row["peak_mib"] = {
            "emix_send": round(max(send_peaks), 1) if send_peaks else None,
            "hub_processes": round(max(hwm_mib(p) for p in self.hub.worker_pids()), 1),
            "gateway_a": round(hwm_mib(self.gateways["a"].pid), 1),
            "gateway_b": round(hwm_mib(self.gateways["b"].pid), 1),
            "orthanc": round(
                max(hwm_mib(self.pacs_a.process.pid), hwm_mib(self.pacs_b.process.pid)), 1
            ),
        }
        mb = row["mb"]
        row["throughput_mb_s"] = {
            name: round(mb / row[key]["median"], 1)
            for name, key in (
                ("ingest_emix", "ingest_emix_s"),
                ("ingest_orthanc", "ingest_orthanc_requests_s"),
                ("zip_emix", "zip_emix_s"),
                ("zip_orthanc", "zip_orthanc_s"),
            )
            if key in row
        }

    def latency(self) -> None:
        from emix_core.content.samples import generate_study

        token = {"Authorization": f"Bearer {self.lakeside.token}"}

        def seen() -> set[str]:
            return {
                p["id"]
                for p in requests.get(f"{self.hub.url}/api/v1/inbox", headers=token).json()[
                    "packages"
                ]
            }

        def once() -> float:
            study = self.work / f"latency-{time.monotonic_ns()}"
            files = sorted(generate_study(study, slices=10, series=1))
            before = seen()
            landed = self.drop(files, study)
            while not (seen() - before):
                time.sleep(0.01)
                if time.monotonic() - landed > 60:
                    raise SystemExit("latency study never arrived")
            return time.monotonic() - landed - SETTLE

        self.start_gateways(progressive=False)
        whole = [once() for _ in range(max(self.reps, 3))]
        self.results["latency_10_slices_whole_s"] = stats(whole)
        self.start_gateways(progressive=True)
        samples = [once() for _ in range(max(self.reps, 3))]
        self.results["latency_10_slices_s"] = stats(samples)


def parsed(base: str, study_uid: str, headers: dict[str, str]) -> float:
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(base, headers=headers)
    started = time.monotonic()
    instances = client.retrieve_study(study_uid, media_types=(("application/dicom", "*"),))
    assert instances
    return time.monotonic() - started


def physical(work: Path, study: Path) -> dict[str, float]:
    """The machine's limits: copying the study (each file fsynced) and AES-256-GCM on one core."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    files = [p for p in study.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    target = work / "copy"
    target.mkdir()
    started = time.monotonic()
    for i, path in enumerate(files):
        with open(path, "rb") as src, open(target / f"{i}.dcm", "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
    copy = size / (time.monotonic() - started) / 1e6
    aes = AESGCM(os.urandom(32))
    block = os.urandom(1 << 20)
    started = time.monotonic()
    for i in range(512):
        aes.encrypt(i.to_bytes(12, "big"), block, b"")
    gcm = 512 * (1 << 20) / (time.monotonic() - started) / 1e6
    return {"disk_copy_mb_s": round(copy, 1), "aes_gcm_mb_s_one_core": round(gcm, 1)}


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
    }


def ratio(emix: float, other: float) -> str:
    return f"{other / emix:.2f}x" if emix else "-"


def report(results: dict[str, Any]) -> str:
    """A Markdown table of medians (min–max) and ratios."""
    lines = [
        "| slices | MB | measure | emix s | Orthanc s | emix speed vs Orthanc |",
        "|---:|---:|---|---:|---:|---:|",
    ]

    def cell(s: dict[str, float]) -> str:
        return f"{s['median']:.2f} ({s['min']:.2f}–{s['max']:.2f})"

    for slices, row in results["sizes"].items():
        pairs = [
            ("ingest (send vs STOW requests)", "ingest_emix_s", "ingest_orthanc_requests_s"),
            (
                "ingest (send vs STOW dicomweb-client)",
                "ingest_emix_s",
                "ingest_orthanc_dicomweb_client_s",
            ),
            ("end to end (gateways vs direct STOW)", "e2e_emix_s", "e2e_direct_stow_s"),
            (
                "end to end, progressive off (whole packages)",
                "e2e_emix_whole_s",
                "e2e_direct_stow_s",
            ),
            ("zip download vs archive", "zip_emix_s", "zip_orthanc_s"),
            ("WADO-RS raw", "wado_raw_emix_s", "wado_raw_orthanc_s"),
            ("WADO-RS parsed (dicomweb-client)", "wado_parsed_emix_s", "wado_parsed_orthanc_s"),
            (
                "C-STORE (storescu into dimse listen vs Orthanc)",
                "c_store_emix_s",
                "c_store_orthanc_s",
            ),
        ]
        for label, mine, theirs in pairs:
            if mine not in row:  # a results.json from before this measure
                continue
            lines.append(
                f"| {slices} | {row['mb']} | {label} | {cell(row[mine])} | "
                f"{cell(row[theirs])} | "
                f"{ratio(row[mine]['median'], row[theirs]['median'])} |"
            )
    lines += [
        "",
        "| slices | peak MiB: emix send | hub process | gateway A | gateway B | Orthanc |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for slices, row in results["sizes"].items():
        p = row["peak_mib"]
        lines.append(
            f"| {slices} | {p['emix_send']} | {p['hub_processes']} | {p['gateway_a']}"
            f" | {p['gateway_b']} | {p['orthanc']} |"
        )
    lat = results.get("latency_10_slices_s")
    if lat:
        lines += [
            "",
            f"10-slice latency, settled in A's outbox → listed in B's inbox: "
            f"median {lat['median']:.3f} s (min {lat['min']:.3f}, max {lat['max']:.3f})",
        ]
        whole = results.get("latency_10_slices_whole_s")
        if whole:
            lines.append(
                f"  the same with progressive off: median {whole['median']:.3f} s "
                f"(min {whole['min']:.3f}, max {whole['max']:.3f})"
            )
    phys = results.get("physical")
    if phys:
        lines += [
            f"Physical limits: disk copy {phys['disk_copy_mb_s']} MB/s, AES-256-GCM "
            f"{phys['aes_gcm_mb_s_one_core']} MB/s on one core"
        ]
    return "\n".join(lines)


def in_private_network() -> None:
    """Re-run inside a network namespace with loopback only, when possible."""
    if os.environ.get("EMIX_BENCH_NETNS") or os.geteuid() != 0 or not shutil.which("unshare"):
        return
    command = " ".join(["ip link set lo up &&", "exec", sys.executable, *map(repr, sys.argv)])
    env = {**os.environ, "EMIX_BENCH_NETNS": "1"}
    sys.exit(subprocess.call(["unshare", "--net", "sh", "-c", command], env=env))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10, 50, 200 slices, 1 run each")
    parser.add_argument("--sizes", type=int, nargs="+", help="slices per study")
    parser.add_argument("--reps", type=int, help="repetitions of each measure")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.json")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=MEASURES,
        help="run only these measures (download needs ingest's package: it runs ingest too)",
    )
    args = parser.parse_args()
    in_private_network()
    sizes = args.sizes or ([10, 50, 200] if args.quick else [10, 200, 1000])
    reps = args.reps or (1 if args.quick else 3)
    os.environ.setdefault("EMIX_DISABLED_PLUGINS", "")
    # dcmtk (storescu, and Orthanc's DICOM server started below) disables Nagle's
    # algorithm only when told; emix's listener sets it itself
    os.environ["TCP_NODELAY"] = "1"
    started = time.monotonic()
    folder = tempfile.mkdtemp(prefix="emix-bench-")
    try:
        bench = Bench(Path(folder), reps, set(args.only or MEASURES))
        try:
            bench.start_gateways()
            for slices in sizes:
                bench.size(slices)
            if "latency" in bench.only:
                bench.latency()
            bench.results["physical"] = physical(Path(folder), Path(folder) / f"study-{sizes[-1]}")
        finally:
            bench.close()
    finally:
        if args.keep:
            print(f"work folder kept: {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    bench.results["seconds"] = round(time.monotonic() - started, 1)
    bench.results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.write_text(json.dumps(bench.results, indent=2))
    print("\n" + report(bench.results))
    print(f"\nwritten to {args.out} in {bench.results['seconds']} s")


if __name__ == "__main__":
    main()
