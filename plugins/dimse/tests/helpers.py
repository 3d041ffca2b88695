"""Helpers of the DIMSE tests: a listener process, dcmtk tools, dataset comparison."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from emix_core.testing import HubProcess, emix, free_port

DCMTK = shutil.which("storescu") and shutil.which("echoscu")


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a DICOM file after its File Meta Information (group 0002)."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM", path
    # (0002,0000) UL, explicit VR little endian: tag 4, VR 2, length 2, value 4
    tag, vr, length, group_length = struct.unpack("<I2sHI", data[132:144])
    assert tag == 0x00000002 and vr == b"UL" and length == 4
    return data[144 + group_length :]


def as_dcmtk_sends(
    sources: Sequence[Path], folder: Path, *, study_uid: str | None = None
) -> list[Path]:
    """Copies of ``sources`` in one study, each with its own SOP Instance UID, encoded
    as dcmtk puts a data set on the wire (explicit-length sequences, no trailing
    padding: both allowed re-encodings). Then every byte sent must arrive."""
    import pydicom
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    out = []
    for index, source in enumerate(sources):
        ds = pydicom.dcmread(source)
        ds.StudyInstanceUID = study_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        staged = folder / f".{index}.dcm"
        ds.save_as(staged, enforce_file_format=True)
        target = folder / f"{index:03d}-{source.name}"
        subprocess.run(["dcmconv", "-p", str(staged), str(target)], check=True, timeout=60)
        staged.unlink()
        out.append(target)
    return out


@dataclass
class ListenerProcess:
    """``emix dimse listen`` in a child process, sending as facility ``address``."""

    root: Path
    hub: HubProcess | None
    address: str
    args: list[str] = field(default_factory=list)
    ae_title: str = "EMIX"
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def log(self) -> Path:
        return self.root / "listen.log"

    def env(self) -> dict[str, str]:
        if self.hub is None:  # nothing leaves: what arrives stays in the spool
            return {
                "EMIX_HOME": str(self.home),
                "EMIX_HUB_URL": "http://127.0.0.1:9",
                "EMIX_TOKEN": "emx_offline",
            }
        return {
            "EMIX_HOME": str(self.home),
            "EMIX_HUB_URL": self.hub.url,
            "EMIX_TOKEN": self.hub.facilities[self.address]["token"],
        }

    def batches(self) -> list[str]:
        """States of the spool's batches (sending, sealing, sent)."""
        import sqlite3

        journals = list((self.home / "dimse-listen").glob("dimse-*/journal.db"))
        if not journals:
            return []
        with sqlite3.connect(journals[0], timeout=30) as db:
            return [r[0] for r in db.execute("SELECT state FROM batches ORDER BY id")]

    def spooled(self) -> int:
        """Instances acknowledged and waiting in the spool (read from its journal)."""
        import sqlite3

        journals = list((self.home / "dimse-listen").glob("dimse-*/journal.db"))
        if not journals:
            return 0
        with sqlite3.connect(journals[0], timeout=30) as db:
            return db.execute("SELECT COUNT(*) FROM instances").fetchone()[0]

    def start(self) -> ListenerProcess:
        self.root.mkdir(parents=True, exist_ok=True)
        started = self.log_text().count("dimse.listener.started")
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "emix_core",
                    "dimse",
                    "listen",
                    "--ae-title",
                    self.ae_title,
                    "--port",
                    str(self.port),
                    "--host",
                    "127.0.0.1",
                    *self.args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **self.env()},
            )
        wait_for(
            lambda: (
                self.log_text().count("dimse.listener.started") > started
                or self.process.poll() is not None
            ),
            30,
            "the listener",
        )
        assert self.process.poll() is None, self.log_text()
        return self

    def log_text(self) -> str:
        return self.log.read_text("utf-8", errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def storescu(
    port: int,
    files: Sequence[Path],
    *,
    calling: str = "MODALITY",
    called: str = "EMIX",
    extra: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "storescu",
            "-aet",
            calling,
            "-aec",
            called,
            *extra,
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


def echoscu(port: int, *, calling: str = "MODALITY", called: str = "EMIX"):
    return subprocess.run(
        ["echoscu", "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def inbox(env: dict[str, str]) -> list[dict]:
    return json.loads(emix("inbox", "--json", env=env).stdout)["packages"]


def received_files(package: str, out: Path, env: dict[str, str]) -> list[Path]:
    emix("receive", package, "--out", str(out), env=env)
    return sorted(p for p in (out / package).rglob("*.dcm"))


@dataclass
class GatewayProcess:
    """``emix gateway run`` with a given gateway.toml, in a child process."""

    root: Path
    config: str
    process: subprocess.Popen | None = None

    def start(self) -> GatewayProcess:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "gateway.toml").write_text(self.config, "utf-8")
        with open(self.root / "gateway.log", "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "emix_core",
                    "gateway",
                    "run",
                    "--config",
                    str(self.root / "gateway.toml"),
                    "--log-format",
                    "json",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def log_text(self) -> str:
        path = self.root / "gateway.log"
        return path.read_text("utf-8", errors="replace") if path.exists() else ""

    def wait_listening(self) -> None:
        wait_for(
            lambda: "dimse.listener.started" in self.log_text() or self.process.poll() is not None,
            30,
            "the gateway's listener",
        )
        assert self.process.poll() is None, self.log_text()

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def gateway_config(hub: HubProcess, address: str, *tables: str) -> str:
    token = hub.facilities[address]["token"]
    head = (
        f'[gateway]\nhome = "home"\nhub_url = "{hub.url}"\ntoken = "{token}"\n'
        "poll_seconds = 0.2\nretry_max_seconds = 2\n"
    )
    return head + "\n" + "\n".join(tables)
