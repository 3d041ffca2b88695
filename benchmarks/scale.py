"""Scale row: 8 facilities sending 50-slice studies at once, to one hub instance and to
two instances sharing their engines, on SQLite + a folder and on PostgreSQL + Ceph.

    .venv/bin/python benchmarks/scale.py            # 2 rounds per setup (~10 min)
    .venv/bin/python benchmarks/scale.py --rounds 1 --facilities 4 --slices 20

For every setup it starts the engines and the hub instances on loopback, adds the
facilities, then runs rounds in which every facility sends its study (``emix send``, a
process each) to the next facility, all at once, facility *i* through instance *i mod n*.
It reports throughput (studies, slices and MB per second of wall time, the round from
first start to last seal) and the 95th percentile of the seal latency (one study's
``emix send`` from start to the hub's sealed answer). Needs root for Ceph and PostgreSQL.
Writes ``benchmarks/scale-results.json``. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emix_core.content.samples import generate_study  # noqa: E402
from emix_core.testing import HubProcess, emix, free_port  # noqa: E402
from emix_core.testing.engines import CephRgw, Postgres  # noqa: E402


def p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[max(0, round(0.95 * len(ordered)) - 1)]


def start_instances(work: Path, count: int, database: str | None, blobs: str | None):  # type: ignore[no-untyped-def]
    """Hub instances with the same keys; SQLite + folder instances share one home."""
    shared = [
        *(["--database", database] if database else []),
        *(["--blobs", blobs] if blobs else []),
    ]
    hubs: list[HubProcess] = []
    for n in range(count):
        port = free_port()
        home = work / (f"hub-{n}" if database else "hub")
        if database and hubs:
            shutil.copytree(hubs[0].home / "keys", home / "keys")
        if not hubs or database:
            emix("hub", "init", "--home", str(home), "--port", str(port), *shared)
        hub = HubProcess(home=home, port=port)
        hub.start()
        hubs.append(hub)
    return hubs


def add_facilities(home: Path, count: int) -> list[dict[str, Any]]:
    from emix_core.hub.context import open_hub
    from emix_core.hub.facilities import add_facility

    hub = open_hub(home)
    return [
        add_facility(hub, f"Facility {n}", f"admin@f{n}.example.org", address=f"f{n}")
        for n in range(count)
    ]


def one_round(hubs: list[HubProcess], studies: list[Path], facilities, work: Path, r: int):  # type: ignore[no-untyped-def]
    count = len(studies)

    def send(n: int) -> float:
        env = {
            **os.environ,
            "EMIX_HOME": str(work / f"side-f{n}"),
            "EMIX_HUB_URL": hubs[n % len(hubs)].url,
            "EMIX_TOKEN": facilities[n]["token"],
        }
        started = time.monotonic()
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "emix_core",
                "send",
                str(studies[n]),
                "--to",
                f"f{(n + 1) % count}",
                "--json",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )
        if out.returncode != 0:
            raise RuntimeError(f"send {n} in round {r} failed: {out.stderr[-500:]}")
        return time.monotonic() - started

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=count) as pool:
        latencies = list(pool.map(send, range(count)))
    return time.monotonic() - started, latencies


def run_setup(name: str, instances: int, args, studies, engines) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    work = Path(tempfile.mkdtemp(prefix=f"emix-scale-{name}-"))
    database = blobs = None
    saved = dict(os.environ)
    if engines:
        pg, rgw = engines
        database = pg.new_database()
        blobs = f"s3://{rgw.new_bucket()}/emix"
        os.environ.update(rgw.env)
    hubs = start_instances(work, instances, database, blobs)
    try:
        facilities = add_facilities(hubs[0].home, len(studies))
        walls, latencies = [], []
        for r in range(args.rounds):
            wall, lat = one_round(hubs, studies, facilities, work, r)
            walls.append(wall)
            latencies += lat
        size = sum(p.stat().st_size for s in studies for p in s.rglob("*.dcm"))
        wall = statistics.median(walls)
        row = {
            "setup": name,
            "instances": instances,
            "studies_per_round": len(studies),
            "rounds": args.rounds,
            "wall_s": wall,
            "studies_per_s": len(studies) / wall,
            "slices_per_s": len(studies) * args.slices / wall,
            "mb_per_s": size / 1e6 / wall,
            "seal_p95_s": p95(latencies),
            "seal_median_s": statistics.median(latencies),
        }
        print(
            f"{name:18s} x{instances}: {row['studies_per_s']:.2f} studies/s "
            f"({row['slices_per_s']:.0f} slices/s, {row['mb_per_s']:.0f} MB/s), "
            f"seal p95 {row['seal_p95_s']:.1f} s, median {row['seal_median_s']:.1f} s",
            flush=True,
        )
        return row
    finally:
        for hub in hubs:
            hub.stop()
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(work, ignore_errors=True)


def audit_rate(url: str, threads: int = 8, events: int = 2000) -> dict[str, float]:
    """Appends a second to one audit chain on PostgreSQL from ``threads`` threads (the
    serialised point every instance shares)."""
    import secrets as _secrets

    from emix_core.audit.chain import AuditLog
    from emix_core.model import AuditAction, AuditEvent, AuditOutcome
    from emix_core.store.db import Database

    db = Database(url, pool_size=threads)
    db.create_all()
    log = AuditLog(db.engine, _secrets.token_bytes(32))
    event = AuditEvent(
        event_type="query",
        action=AuditAction.EXECUTE,
        outcome=AuditOutcome.SUCCESS,
        actor="bench",
        detail="inbox listed",
    )
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(lambda _: log.append(event), range(events)))
    seconds = time.monotonic() - started
    assert log.verify().ok
    db.engine.dispose()
    return {"threads": threads, "events": events, "appends_per_s": events / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facilities", type=int, default=8)
    parser.add_argument("--slices", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "scale-results.json")
    parser.add_argument("--audit-only", action="store_true", help="only the audit append rate")
    args = parser.parse_args()
    if args.audit_only:
        pg = Postgres().start()
        try:
            rate = audit_rate(pg.new_database())
        finally:
            pg.stop()
        print(
            f"audit chain on PostgreSQL: {rate['appends_per_s']:.0f} appends/s "
            f"({rate['threads']} threads)"
        )
        return
    data = Path(tempfile.mkdtemp(prefix="emix-scale-studies-"))
    studies = []
    for n in range(args.facilities):
        folder = data / f"study-{n}"
        generate_study(folder, slices=args.slices, series=2, patient_id=f"SCALE-{n:04d}")
        studies.append(folder)
    pg, rgw = Postgres().start(), CephRgw().start()
    rows = []
    audit: dict[str, float] = {}
    try:
        audit = audit_rate(pg.new_database())
        print(f"audit chain on PostgreSQL: {audit['appends_per_s']:.0f} appends/s", flush=True)
        for name, engines in (("sqlite+folder", None), ("postgresql+ceph", (pg, rgw))):
            for instances in (1, 2):
                rows.append(run_setup(name, instances, args, studies, engines))
    finally:
        rgw.stop()
        pg.stop()
        shutil.rmtree(data, ignore_errors=True)
    result = {
        "cpus": os.cpu_count(),
        "facilities": args.facilities,
        "slices": args.slices,
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
