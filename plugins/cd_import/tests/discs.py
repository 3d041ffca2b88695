"""Build real media for the tests: folders holding pydicom's DICOMDIR test set or a
generated series, disc images written by pycdlib or by xorriso, zip archives."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from pydicom.data import get_testdata_file

#: The folders of pydicom's DICOMDIR test set that its DICOMDIR references.
DICOMDIR_FOLDERS = ("77654033", "98892001", "98892003")


def dicomdir_set(dest: Path) -> Path:
    """A copy of pydicom's DICOMDIR test set (2 patients, 6 studies, 31 instances)."""
    source = Path(get_testdata_file("DICOMDIR")).parent
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "DICOMDIR", dest / "DICOMDIR")
    for name in DICOMDIR_FOLDERS:
        shutil.copytree(source / name, dest / name)
    return dest


def iso_name(name: str) -> str:
    """An ISO 9660 Level 1 name with its version: ``6154`` -> ``6154.;1``."""
    base, dot, extension = name.upper().partition(".")
    return f"{base[:8]}.{extension[:3]};1" if dot else f"{base[:8]}.;1"


def pycdlib_iso(
    folder: Path,
    out: Path,
    *,
    rock_ridge: bool = False,
    joliet: bool = False,
    symlinks: dict[str, str] | None = None,
) -> Path:
    """Write ``folder`` as an ISO 9660 image with pycdlib (optionally RR, Joliet, links)."""
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=1, rock_ridge="1.09" if rock_ridge else None, joliet=3 if joliet else None)
    handles = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        iso_path = "/" + "/".join(p.upper()[:8] for p in relative.parts[:-1])
        iso_path = iso_path.rstrip("/")
        extra: dict = {}
        if path.is_dir():
            if rock_ridge:
                extra["rr_name"] = relative.name
            if joliet:
                extra["joliet_path"] = "/" + relative.as_posix()
            iso.add_directory(f"{iso_path}/{relative.name.upper()[:8]}", **extra)
        else:
            if rock_ridge:
                extra["rr_name"] = relative.name
            if joliet:
                extra["joliet_path"] = "/" + relative.as_posix()
            handle = open(path, "rb")  # noqa: SIM115 - closed below
            handles.append(handle)
            iso.add_fp(handle, path.stat().st_size, f"{iso_path}/{iso_name(relative.name)}", **extra)
    for number, (name, target) in enumerate((symlinks or {}).items()):
        iso.add_symlink(symlink_path=f"/LINK{number}.;1", rr_symlink_name=name, rr_path=target)
    with open(out, "wb") as sink:
        iso.write_fp(sink)
    iso.close()
    for handle in handles:
        handle.close()
    return out


def xorriso_iso(folder: Path, out: Path) -> Path:
    """Write ``folder`` as an ISO image with xorriso (Rock Ridge and Joliet), as burning
    software does."""
    subprocess.run(
        ["xorriso", "-as", "mkisofs", "-quiet", "-R", "-J", "-V", "PATIENT_CD", "-o", str(out), str(folder)],
        check=True,
        capture_output=True,
    )
    return out
