"""Helpers of the DIMSE tests: a listener process, dcmtk tools, dataset comparison.

The gateway process and polling come from :mod:`emix_core.testing`."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path

from emix_core.testing import EmixProcess, HubProcess, emix, free_port, gateway_config, wait_for
from emix_core.testing import GatewayProcess as BaseGateway

__all__ = ["DCMTK", "GatewayProcess", "ListenerProcess", "gateway_config", "wait_for"]

DCMTK = shutil.which("storescu") and shutil.which("echoscu")


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


class ListenerProcess(EmixProcess):
    """``emix dimse listen`` in a child process, sending as facility ``address``."""

    def __init__(
        self,
        root: Path,
        hub: HubProcess | None,
        address: str,
        args: list[str] | None = None,
        ae_title: str = "EMIX",
        port: int | None = None,
    ) -> None:
        super().__init__(root / "listen.log")
        self.root = root
        self.hub = hub
        self.address = address
        self.args = list(args or [])
        self.ae_title = ae_title
        self.port = port or free_port()

    @property
    def home(self) -> Path:
        return self.root / "home"

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
        started = self.log_text().count("dimse.listener.started")
        self.spawn(
            "dimse", "listen", "--ae-title", self.ae_title, "--port", str(self.port),
            "--host", "127.0.0.1", *self.args, env=self.env(),
        )  # fmt: skip
        self.wait_logged("dimse.listener.started", after=started)
        return self


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


class GatewayProcess(BaseGateway):
    """A gateway whose DICOM listener is awaited before the test goes on."""

    def wait_listening(self) -> None:
        self.wait_logged("dimse.listener.started")
