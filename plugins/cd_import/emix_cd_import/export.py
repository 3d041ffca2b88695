"""``emix cd export``: a received package becomes IHE PDI media (a folder or an ISO).

The core writes the media (:func:`emix_core.write_pdi_iso`); this module only finds the
package's items in the received folder. The ISO is written beside its final name and
renamed when complete, so a half-written image is never left under that name.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from emix_core import (
    InvalidInput,
    Item,
    LocalHome,
    NotFoundError,
    UnsafePathError,
    item_relative_path,
    package_from_folder,
    receive_package,
    write_pdi_folder,
    write_pdi_iso,
)

__all__ = ["export_inbox_package", "export_package"]


def _open(path: Path) -> BinaryIO:
    return open(path, "rb")  # noqa: SIM115 - the writer closes it


def _entries(folder: Path) -> tuple[Any, list[tuple[Item, Callable[[], BinaryIO]]]]:
    if not (folder / "emix-manifest.json").is_file():
        raise NotFoundError("the folder is not a received package (no emix-manifest.json)")
    try:
        package = package_from_folder(folder)
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInput("the package's manifest cannot be read") from exc
    root = folder.resolve()
    entries: list[tuple[Item, Callable[[], BinaryIO]]] = []
    for item in package.items:
        path = (folder / item_relative_path(item)).resolve()
        if not path.is_relative_to(root):
            raise UnsafePathError("an item path leaves the package folder")
        if not path.is_file():
            raise NotFoundError(f"item {item.id} of the package is missing from its folder")
        entries.append((item, functools.partial(_open, path)))
    return package, entries


def export_package(
    folder: Path, *, iso: Path | None = None, out: Path | None = None
) -> dict[str, Any]:
    """Write the package in ``folder`` as a disc image ``iso`` or a media folder ``out``."""
    package, entries = _entries(Path(folder))
    volume = "EMIX_" + package.id[:11]
    if iso is not None:
        iso = Path(iso)
        if iso.exists():
            raise InvalidInput("the disc image exists already; emix does not overwrite it")
        partial = iso.with_name(f".{iso.name}.partial")
        try:
            with open(partial, "wb") as sink:
                write_pdi_iso(entries, sink, volume_id=volume)
                sink.flush()
                os.fsync(sink.fileno())
            os.replace(partial, iso)
        finally:
            partial.unlink(missing_ok=True)
        target, size = iso, iso.stat().st_size
    else:
        assert out is not None
        target = write_pdi_folder(entries, Path(out))
        size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    dicom = sum(1 for item, _ in entries if item.media_type == "application/dicom")
    return {
        "package": package.id,
        "path": str(target),
        "kind": "iso" if iso is not None else "folder",
        "instances": dicom,
        "documents": len(entries) - dicom,
        "bytes": size,
    }


def export_inbox_package(
    package_id: str,
    *,
    client: Any,
    home: LocalHome,
    iso: Path | None = None,
    out: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Receive a package from the inbox (verified, receipt posted), write it as media,
    and remove the downloaded copy."""
    work = home.path / "tmp"
    work.mkdir(parents=True, exist_ok=True, mode=0o700)
    staging = Path(tempfile.mkdtemp(prefix="emix-cd-export-", dir=work))
    try:
        received = receive_package(package_id, staging, client=client, home=home, progress=progress)
        return export_package(received.path, iso=iso, out=out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
