"""Real database and object-store engines for scale-out tests, started on loopback.

* :class:`Postgres`: PostgreSQL (Debian ``postgresql``) in a temporary folder: ``initdb``
  and ``pg_ctl`` run as the unprivileged ``postgres`` user when the tests run as root,
  TCP on ``127.0.0.1:<free port>`` with password (SCRAM) authentication for the hub,
  trust on a private unix socket for the fixture's own administration.
* :class:`CephRgw`: a single-node Ceph cluster (Debian ``ceph-mon``, ``ceph-osd``,
  ``radosgw``): one monitor, one BlueStore OSD on a sparse file, the RADOS Gateway's
  beast frontend on ``127.0.0.1:<free port>``, cephx authentication, an S3 user.

Nothing here touches systemd or any port but the free ones it picks; ``stop()`` ends
exactly the daemons it started, by the pids they recorded.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emix_core.testing import free_port

PG_USER = "postgres"


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL server binaries (Debian layout), or ``None``."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version_key)
    return Path(found[-1]).parent if found else None


def _version_key(path: str) -> int:
    try:
        return int(Path(path).parent.parent.name)
    except ValueError:
        return 0


def _as_user(user: str | None) -> list[str]:
    return ["runuser", "-u", user, "--"] if user else []


def _wait(check: Any, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not come up within {timeout:.0f}s\n{tail}")


@dataclass
class Postgres:
    """A PostgreSQL server of its own in a temporary folder."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="emix-pg-")))
    port: int = field(default_factory=free_port)
    password: str = field(default_factory=lambda: secrets.token_hex(12))
    role: str = "emix"
    bin: Path | None = field(default_factory=postgres_bin)

    @property
    def os_user(self) -> str | None:
        return PG_USER if os.geteuid() == 0 else None

    def _run(self, *args: str) -> None:
        subprocess.run(
            [*_as_user(self.os_user), *args], check=True, capture_output=True, timeout=120, cwd="/"
        )

    def start(self) -> Postgres:
        if self.bin is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        data, run = self.root / "data", self.root / "run"
        self.root.chmod(0o755)
        run.mkdir()
        if self.os_user:
            shutil.chown(run, self.os_user)
            data.mkdir(mode=0o700)
            shutil.chown(data, self.os_user)
            shutil.chown(self.root, self.os_user)
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
        )
        with open(data / "postgresql.conf", "a") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{run}'\nmax_connections = 300\n"
                "shared_buffers = 64MB\nfsync = off\nfull_page_writes = off\n"
                "logging_collector = off\n"
            )
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(self.root / "postgres.log"),
            "-w",
            "-t",
            "60",
            "start",
        )
        self.admin(
            f"CREATE ROLE {self.role} LOGIN PASSWORD '{self.password}'",
            f"CREATE DATABASE {self.role} OWNER {self.role}",
        )
        return self

    def admin(self, *statements: str, database: str = "postgres") -> None:
        """Run statements as the superuser over the private unix socket."""
        import psycopg

        with psycopg.connect(
            host=str(self.root / "run"),
            port=self.port,
            user="postgres",
            dbname=database,
            autocommit=True,
        ) as conn:
            for statement in statements:
                conn.execute(statement)

    def url(self, database: str | None = None) -> str:
        """``postgresql://`` URL of a database, as the (non-superuser) role."""
        name = database or self.role
        return f"postgresql://{self.role}:{self.password}@127.0.0.1:{self.port}/{name}"

    def new_database(self, name: str | None = None) -> str:
        """Create an empty database owned by the role; return its URL."""
        name = name or f"t_{secrets.token_hex(6)}"
        self.admin(f"CREATE DATABASE {name} OWNER {self.role}")
        return self.url(name)

    def stop(self) -> None:
        data = self.root / "data"
        if self.bin is not None and (data / "postmaster.pid").exists():
            try:
                self._run(str(self.bin / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
            except subprocess.SubprocessError:
                pid = int((data / "postmaster.pid").read_text().split()[0])
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


def ceph_installed() -> bool:
    return all(shutil.which(b) for b in ("ceph-mon", "ceph-osd", "radosgw", "ceph-authtool"))


@dataclass
class CephRgw:
    """A one-monitor, one-OSD Ceph cluster with the RADOS Gateway (S3) on loopback."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="emix-ceph-")))
    access_key: str = field(default_factory=lambda: "EMIX" + secrets.token_hex(8).upper())
    secret_key: str = field(default_factory=lambda: secrets.token_hex(20))
    port: int = field(default_factory=free_port)
    osd_bytes: int = 8 * 1024**3

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What a hub process needs to reach the gateway (the variables boto3 reads)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def _ceph(self, *args: str, stdin: str | None = None) -> str:
        return subprocess.run(
            ["ceph", "-c", str(self.conf), "--connect-timeout", "20", *args],
            check=True,
            capture_output=True,
            text=True,
            input=stdin,
            timeout=120,
        ).stdout.strip()

    def _write_conf(self, mon: str) -> None:
        r = self.root
        self.conf.write_text(
            f"""[global]
fsid = {self.fsid}
mon host = {mon}
public addr = 127.0.0.1
cluster addr = 127.0.0.1
run dir = {r}/run
crash dir = {r}/crash
pid file = {r}/run/$name.pid
log file = {r}/log/$name.log
log to stderr = false
err to stderr = true
mon cluster log file = {r}/log/cluster.log
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
mon data avail warn = 2
mon data avail crit = 1
auth allow insecure global id reclaim = false
ms bind ipv6 = false
admin socket = {r}/run/$name.asok

[mon]
mon data = {r}/mon/$id
paxos propose interval = 0.1

[osd]
osd data = {r}/osd/$id
osd objectstore = bluestore
bluestore block create = true
bluestore block size = {self.osd_bytes}
bluestore fsck on mkfs = false
osd memory target = 939524096

[client]
keyring = {r}/admin.keyring

[client.rgw.emix]
keyring = {r}/rgw.keyring
rgw data = {r}/rgw
rgw frontends = beast endpoint=127.0.0.1:{self.port}
rgw thread pool size = 64
"""
        )

    def start(self) -> CephRgw:
        r = self.root
        for sub in ("mon", "osd/0", "run", "log", "crash", "rgw"):
            (r / sub).mkdir(parents=True)
        self.conf = r / "ceph.conf"
        self.fsid = str(uuid.uuid4())
        v2, v1 = free_port(), free_port()
        mon = f"[v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]"
        self._write_conf(mon)
        err = open(r / "log" / "daemons.err", "ab")  # noqa: SIM115 - daemons inherit it

        def run(*args: str) -> None:
            subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=err, timeout=180)

        tool = "ceph-authtool"
        run(
            tool,
            "--create-keyring",
            f"{r}/mon.keyring",
            "--gen-key",
            "-n",
            "mon.",
            "--cap",
            "mon",
            "allow *",
        )
        run(
            tool,
            "--create-keyring",
            f"{r}/admin.keyring",
            "--gen-key",
            "-n",
            "client.admin",
            "--cap",
            "mon",
            "allow *",
            "--cap",
            "osd",
            "allow *",
            "--cap",
            "mgr",
            "allow *",
        )
        run(tool, f"{r}/mon.keyring", "--import-keyring", f"{r}/admin.keyring")
        run("monmaptool", "--create", "--fsid", self.fsid, "--addv", "a", mon, f"{r}/monmap")
        run(
            "ceph-mon",
            "-c",
            str(self.conf),
            "--mkfs",
            "-i",
            "a",
            "--monmap",
            f"{r}/monmap",
            "--keyring",
            f"{r}/mon.keyring",
        )
        run("ceph-mon", "-c", str(self.conf), "-i", "a")
        _wait(lambda: self._ceph("mon", "stat"), 60, "ceph-mon", r / "log" / "mon.a.log")

        osd_uuid = str(uuid.uuid4())
        secret = subprocess.run(
            [tool, "--gen-print-key"], capture_output=True, text=True, check=True
        ).stdout.strip()
        osd_id = self._ceph(
            "osd", "new", osd_uuid, "-i", "-", stdin=f'{{"cephx_secret": "{secret}"}}'
        )
        run(
            tool,
            "--create-keyring",
            f"{r}/osd/{osd_id}/keyring",
            "--name",
            f"osd.{osd_id}",
            "--add-key",
            secret,
        )
        run("ceph-osd", "-c", str(self.conf), "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid)
        run("ceph-osd", "-c", str(self.conf), "-i", osd_id)
        _wait(lambda: "1 up" in self._ceph("osd", "stat"), 180, "ceph-osd", r / "log" / "osd.0.log")

        for pool in ("default.rgw.buckets.data", "default.rgw.buckets.non-ec"):
            self._ceph("osd", "pool", "create", pool, "8", "8", "replicated")
            self._ceph("osd", "pool", "application", "enable", pool, "rgw")
        self._ceph(
            "auth",
            "get-or-create",
            "client.rgw.emix",
            "mon",
            "allow rw",
            "osd",
            "allow rwx",
            "mgr",
            "allow rw",
            "-o",
            f"{r}/rgw.keyring",
        )
        run("radosgw", "-c", str(self.conf), "-n", "client.rgw.emix")

        def answering() -> bool:
            import requests

            return requests.get(self.endpoint, timeout=2).status_code == 200

        _wait(answering, 240, "radosgw", r / "log" / "client.rgw.emix.log")
        run(
            "radosgw-admin",
            "-c",
            str(self.conf),
            "user",
            "create",
            "--uid",
            "emix",
            "--display-name",
            "emix tests",
            "--access-key",
            self.access_key,
            "--secret-key",
            self.secret_key,
        )
        return self

    def client(self) -> Any:
        """A boto3 S3 client for this gateway (SigV4, path-style addressing)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
        )

    def new_bucket(self, name: str | None = None) -> str:
        name = name or f"emix-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return name

    def objects(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key under a prefix."""
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def stop(self) -> None:
        for name in ("client.rgw.emix", "osd.0", "mon.a"):
            pid_file = self.root / "run" / f"{name}.pid"
            if not pid_file.exists():
                continue
            pid = int(pid_file.read_text().strip() or 0)
            if pid and _is_ours(pid, self.root):
                os.kill(pid, signal.SIGTERM)
                for _ in range(50):
                    if not Path(f"/proc/{pid}").exists():
                        break
                    time.sleep(0.2)
                else:
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


def _is_ours(pid: int, root: Path) -> bool:
    try:
        return str(root) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def running_as(user: str) -> bool:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name == user
    except KeyError:
        return False
