"""WADO-RS: retrieve instances from a PACS into a folder, streamed, never transcoded.

Every request asks for ``transfer-syntax=*`` so the PACS sends each instance as it
stored it (JPEG, JPEG 2000, JPEG-LS, RLE, multi-frame...); each part of the multipart
answer goes straight to its own file, so memory holds one network chunk at a time.
File names are counters, never UIDs.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from emix_core import InvalidInput, is_valid_uid
from emix_dicomweb.connection import PacsConnection, PacsError, PacsUnavailable
from emix_dicomweb.multipart import PartEnd, PartHeaders, boundary_of, iter_multipart

__all__ = ["ACCEPT_ORIGINAL", "Retrieval", "retrieve_all"]

#: Ask for every instance in the transfer syntax the PACS stored it in.
ACCEPT_ORIGINAL = 'multipart/related; type="application/dicom"; transfer-syntax=*'
CHUNK = 1024 * 1024
ATTEMPTS = 4


@dataclass
class Retrieval:
    """One WADO-RS request: a study, a series or a single instance (UIDs validated)."""

    study_uid: str
    series_uid: str | None = None
    sop_instance_uid: str | None = None

    def __post_init__(self) -> None:
        for uid in (self.study_uid, self.series_uid, self.sop_instance_uid):
            if uid is not None and not is_valid_uid(uid):
                raise PacsError("the PACS listed an instance with a malformed UID; not retrieved")

    @property
    def path(self) -> str:
        path = f"/studies/{self.study_uid}"
        if self.series_uid:
            path += f"/series/{self.series_uid}"
            if self.sop_instance_uid:
                path += f"/instances/{self.sop_instance_uid}"
        return path


@dataclass
class RetrieveResult:
    """Files written, bytes, seconds."""

    files: list[Path] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0


def _retrieve_once(conn: PacsConnection, retrieval: Retrieval, folder: Path) -> list[Path]:
    response = conn.request("GET", retrieval.path, headers={"Accept": ACCEPT_ORIGINAL}, stream=True)
    try:
        if response.status_code == 204:
            return []
        if response.status_code != 200:
            raise conn.error_for(response, "WADO-RS")
        try:
            boundary = boundary_of(response.headers.get("Content-Type", ""))
        except InvalidInput as exc:
            raise PacsError(
                f"WADO-RS on the PACS at {conn.host} did not answer multipart/related "
                "(does it support DICOMweb retrieval with transfer-syntax=*?)"
            ) from exc
        files: list[Path] = []
        sink: BinaryIO | None = None
        try:
            for event in iter_multipart(response.iter_content(CHUNK), boundary):
                if isinstance(event, PartHeaders):
                    media_type = event.headers.get("content-type", "application/dicom")
                    if not media_type.lower().startswith("application/dicom"):
                        raise PacsError(
                            f"WADO-RS on the PACS at {conn.host} sent a part that is not "
                            "application/dicom"
                        )
                    path = folder / f"instance-{len(files) + 1:06d}.dcm"
                    sink = open(path, "xb")  # noqa: SIM115 - closed at PartEnd or below
                    files.append(path)
                elif isinstance(event, PartEnd):
                    assert sink is not None
                    sink.close()
                    sink = None
                else:
                    assert sink is not None
                    sink.write(event)
        except InvalidInput as exc:
            raise PacsUnavailable(
                f"WADO-RS answer of the PACS at {conn.host} was cut off or malformed "
                f"({exc.message})"
            ) from exc
        except OSError as exc:
            raise PacsError(f"cannot write retrieved instances ({exc.strerror})") from exc
        finally:
            if sink is not None:
                sink.close()
        return files
    finally:
        response.close()


def _retrieve_with_retry(conn: PacsConnection, retrieval: Retrieval, folder: Path) -> list[Path]:
    """Retrieve into a folder of its own; a failed attempt is wiped and tried again."""
    for attempt in range(ATTEMPTS):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, mode=0o700)
        try:
            return _retrieve_once(conn, retrieval, folder)
        except PacsUnavailable:
            if attempt == ATTEMPTS - 1:
                raise
            time.sleep(0.5 * 2**attempt)
    return []


def retrieve_all(
    conn: PacsConnection,
    retrievals: Sequence[Retrieval],
    folder: Path,
    *,
    parallel: int = 2,
) -> RetrieveResult:
    """Run the retrievals (each into ``folder/part-NNNNN/``), ``parallel`` at a time.

    :raises PacsUnavailable: the PACS stayed unreachable after retries.
    :raises PacsError: the PACS refused a retrieval.
    """
    started = time.monotonic()
    result = RetrieveResult()
    targets = [(r, folder / f"part-{i:05d}") for i, r in enumerate(retrievals, start=1)]
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = [pool.submit(_retrieve_with_retry, conn, r, t) for r, t in targets]
        for future in futures:
            result.files += future.result()
    result.bytes = sum(p.stat().st_size for p in result.files)
    result.seconds = time.monotonic() - started
    return result
