"""Drop-folder latency and memory, measured with real processes on this machine.

For each study size: ``cp -r`` of the study on the same disk (the reference), then the
same ``cp -r`` into facility A's outbox and the time until the study is complete in
facility B's inbox (the inbox folder appears by an atomic rename, so appearing means
complete). Prints one JSON object; also the gateways' peak memory (VmHWM).

Run from the repository root:  .venv/bin/python plugins/folder_watch/benchmarks/latency.py
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emix_core.content.samples import generate_study  # noqa: E402
from emix_core.testing import make_hub  # noqa: E402
from plugins.folder_watch.tests.sites import Site  # noqa: E402

SIZES = {"10 slices": 10, "1000 slices": 1000}
if len(sys.argv) > 1:
    SIZES = {f"{n} slices": int(n) for n in sys.argv[1:]}
SETTLE = {"settle_seconds": 1.0, "file_settle_seconds": 0.5}


def vm_hwm_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) / 1024  # type: ignore[union-attr]


def log_time(site: Site, event: str, after: float) -> float | None:
    """Wall time of the first ``event`` logged by a site's gateway after ``after``."""
    for line in site.log_text().splitlines():
        record = json.loads(line)
        if record["event"] != event:
            continue
        stamp = datetime.fromisoformat(record["time"].replace("Z", "+00:00")).timestamp()
        if stamp >= after:
            return stamp
    return None


def last_field(site: Site, event: str, name: str) -> object:
    """A field of the last ``event`` a site's gateway logged."""
    value = None
    for line in site.log_text().splitlines():
        record = json.loads(line)
        if record["event"] == event:
            value = record.get(name)
    return value


def main() -> None:
    work = Path(
        tempfile.mkdtemp(
            prefix="emix-fw-bench-",
        )
    )
    hub = make_hub(work)
    results: dict[str, object] = {"settings": SETTLE}
    sites: dict[str, Site] = {}
    try:
        hub.add_facility("Mercy General", "a@mercy.example.org", "mercy")
        hub.add_facility("Lakeside Imaging", "b@lakeside.example.org", "lakeside")
        for address in ("mercy", "lakeside"):
            root = work / "sites" / address
            for name in ("outbox", "inbox", "sent", "failed"):
                (root / name).mkdir(parents=True)
            sites[address] = Site(address, root, hub, dict(SETTLE))
            sites[address].start()
        mercy, lakeside = sites["mercy"], sites["lakeside"]
        time.sleep(2)
        for label, slices in SIZES.items():
            study = work / f"study-{slices}"
            generate_study(study, slices=slices, series=2)
            size = sum(p.stat().st_size for p in study.rglob("*") if p.is_file())
            started = time.monotonic()
            subprocess.run(["cp", "-r", str(study), str(work / f"cp-{slices}")], check=True)
            subprocess.run(["sync"], check=True)
            cp_seconds = time.monotonic() - started
            shutil.rmtree(work / f"cp-{slices}")
            before = set(lakeside.inbox_packages("mercy"))
            started = time.monotonic()
            subprocess.run(
                ["cp", "-r", str(study), str(mercy.outbox_for("lakeside") / study.name)], check=True
            )
            landed, landed_wall = time.monotonic(), time.time()
            while not set(lakeside.inbox_packages("mercy")) - before:
                time.sleep(0.01)
            arrived = time.monotonic()
            sealed = log_time(mercy, "batch.sending", landed_wall - 1)
            results[label] = {
                "bytes": size,
                "cp_seconds": round(cp_seconds, 2),
                "drop_cp_seconds": round(landed - started, 2),
                "last_file_to_inbox_seconds": round(arrived - landed, 2),
                # from the moment the gateway judged the study complete and began sending
                "sending_to_inbox_seconds": (
                    round(landed_wall + (arrived - landed) - sealed, 2) if sealed else None
                ),
            }
            results[label]["steps"] = {  # type: ignore[index]
                "send_seconds": last_field(mercy, "package.sent", "seconds"),
                "receive_seconds": last_field(lakeside, "package.received", "seconds"),
                "deliver_seconds": last_field(lakeside, "package.delivered", "seconds"),
            }
            print(label, results[label], file=sys.stderr)
            time.sleep(2)
        results["peak_memory_mib"] = {
            "sending_gateway": round(vm_hwm_mib(mercy.process.pid), 1),  # type: ignore[union-attr]
            "receiving_gateway": round(vm_hwm_mib(lakeside.process.pid), 1),  # type: ignore[union-attr]
        }
    finally:
        for site in sites.values():
            site.stop()
        hub.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
