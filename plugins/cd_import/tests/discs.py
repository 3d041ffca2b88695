"""Build real media for the tests: folders holding pydicom's DICOMDIR test set or a
generated series, disc images written by pycdlib or by xorriso, zip archives."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

from pydicom.data import get_testdata_file

#: The patient id of the generated "foreign" series.
FOREIGN_ID = "EXT-55-0917"

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


LEVEL1 = re.compile(r"[A-Z0-9_]{1,8}(\.[A-Z0-9_]{1,3})?")


def level1(name: str, number: int, is_dir: bool) -> str:
    """The name itself when ISO 9660 Level 1 allows it, else a made-up one (as burning
    software does; Rock Ridge and Joliet then carry the real name)."""
    upper = name.upper()
    if LEVEL1.fullmatch(upper) and not (is_dir and "." in upper):
        return upper
    return f"{'D' if is_dir else 'F'}{number:07d}"


def iso_name(name: str) -> str:
    """An ISO 9660 Level 1 file name with its version: ``6154`` -> ``6154.;1``."""
    return f"{name};1" if "." in name else f"{name}.;1"


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
    iso.new(
        interchange_level=1, rock_ridge="1.09" if rock_ridge else None, joliet=3 if joliet else None
    )
    handles = []
    names: dict[Path, str] = {folder: ""}
    for number, path in enumerate(sorted(folder.rglob("*"))):
        relative = path.relative_to(folder)
        iso_path = names[path.parent]
        names[path] = f"{iso_path}/{level1(path.name, number, path.is_dir())}"
        extra: dict = {}
        if path.is_dir():
            if rock_ridge:
                extra["rr_name"] = relative.name
            if joliet:
                extra["joliet_path"] = "/" + relative.as_posix()
            iso.add_directory(names[path], **extra)
        else:
            if rock_ridge:
                extra["rr_name"] = relative.name
            if joliet:
                extra["joliet_path"] = "/" + relative.as_posix()
            handle = open(path, "rb")  # noqa: SIM115 - closed below
            handles.append(handle)
            iso.add_fp(handle, path.stat().st_size, iso_name(names[path]), **extra)
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
        [
            "xorriso",
            "-as",
            "mkisofs",
            "-quiet",
            "-R",
            "-J",
            "-V",
            "PATIENT_CD",
            "-o",
            str(out),
            str(folder),
        ],
        check=True,
        capture_output=True,
    )
    return out


def rewrite_dicomdir(path: Path, change) -> None:  # noqa: ANN001 - a test helper
    """Change a DICOMDIR's records with ``change(ds, records)``, keeping its offsets right.

    ``change`` may edit values (lengths change) and set offsets to record *indexes*
    through :func:`point`; every offset is then translated to the records' new positions.
    Offsets that name no record (hostile ones) are kept as given.
    """
    import pydicom

    ds = pydicom.dcmread(path)
    records = list(ds.DirectoryRecordSequence)
    old = {r.seq_item_tell: i for i, r in enumerate(records)}
    keys = (
        "OffsetOfTheNextDirectoryRecord",
        "OffsetOfReferencedLowerLevelDirectoryEntity",
    )
    roots = (
        "OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity",
        "OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity",
    )
    # offsets as record indexes (or ("raw", value) for offsets that name no record)
    as_index = {
        (id(r), k): (old[r[k].value] if r[k].value in old else ("raw", r[k].value))
        for r in records
        for k in keys
        if r[k].value
    }
    root_index = {k: old.get(ds[k].value, ("raw", ds[k].value)) for k in roots}
    overrides: dict = {}
    change(ds, records, overrides)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    tells = [
        r.seq_item_tell
        for r in pydicom.dcmread(io.BytesIO(buffer.getvalue())).DirectoryRecordSequence
    ]

    def resolve(value):  # noqa: ANN001, ANN202
        if isinstance(value, tuple):
            return value[1]
        return tells[value]

    for r in records:
        for k in keys:
            target = overrides.get((id(r), k), as_index.get((id(r), k)))
            r[k].value = 0 if target is None else resolve(target)
    for k in roots:
        ds[k].value = resolve(overrides.get(k, root_index[k]))
    ds.save_as(path, enforce_file_format=True)
