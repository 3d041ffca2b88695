"""File-system pieces of the drop folder: what is taken, what is refused, moving files out.

Nothing here follows a link, opens a device, or overwrites a file.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from emix_core import SKIPPED_NAMES, UnsafePathError

PART_SUFFIX = ".part"
SIDECAR_SUFFIX = ".emix.toml"
ERROR_SUFFIX = ".error.txt"
#: Names the drop folder ignores while they are being written.
TEMPORARY_SUFFIXES = (PART_SUFFIX, ".tmp", ".crdownload", ".partial")


def is_in_progress(relative: str) -> bool:
    """A dot-file, a file in a dot-folder, or ``*.part``: still being written, not taken."""
    parts = PurePosixPath(relative).parts
    return any(p.startswith(".") for p in parts) or parts[-1].lower().endswith(TEMPORARY_SUFFIXES)


def is_ignored_name(name: str) -> bool:
    """Files that are never sent but moved to ``sent`` with the rest (DICOMDIR, OS litter,
    error notes from an earlier failure)."""
    return name in SKIPPED_NAMES or name.endswith(ERROR_SUFFIX)


def walk(root: Path) -> Iterator[Path]:
    """Every non-directory entry under ``root`` (links not followed, dot-folders skipped)."""
    try:
        entries = list(os.scandir(root))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if not entry.name.startswith("."):
                yield from walk(Path(entry.path))
        else:
            yield Path(entry.path)


def refusal(path: Path, root: Path, st: os.stat_result, max_bytes: int) -> str | None:
    """Why a settled entry of the drop folder must not be sent, or ``None`` when it may.

    :param st: the entry's ``lstat``.
    """
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return "a symbolic link whose target does not exist; emix sends only regular files"
        if not target.is_relative_to(root.resolve()):
            return (
                "a symbolic link to a file outside the drop folder; emix never follows links "
                "out of the folder. Copy the file itself into the folder to send it."
            )
        return "a symbolic link; emix sends only regular files. Copy the file itself instead."
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file, not a regular file; emix never reads devices"
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return "a pipe or socket, not a regular file; emix never reads them"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    if st.st_nlink > 1:
        return (
            f"this file has {st.st_nlink} hard links: the same data is reachable under another "
            "name, possibly outside the drop folder, so emix refuses it. Copy the file "
            "(cp, not ln) into the folder to send it."
        )
    if st.st_size > max_bytes:
        return (
            f"the file is {st.st_size} bytes, larger than the limit of {max_bytes} bytes "
            "(max_file_bytes in gateway.toml); raise the limit or split the export"
        )
    return None


def unique_target(folder: Path, relative: str, taken: set[str]) -> str:
    """A relative path under ``folder`` that exists nowhere yet: ``name (2).ext`` etc.

    :param taken: relative paths already promised to other files (updated).
    """
    candidate = PurePosixPath(relative)
    stem, suffix = _split(candidate.name)
    number = 1
    while str(candidate) in taken or os.path.lexists(folder / candidate):
        number += 1
        candidate = candidate.with_name(f"{stem} ({number}){suffix}")
    taken.add(str(candidate))
    return str(candidate)


def _split(name: str) -> tuple[str, str]:
    for double in (".emix.toml", ".error.txt", ".tar.gz"):
        if name.endswith(double) and len(name) > len(double):
            return name[: -len(double)], double
    stem, dot, ext = name.rpartition(".")
    return (stem, dot + ext) if stem and dot else (name, "")


def move_out(source: Path, target: Path) -> None:
    """Move a file (or link, or device node) to ``target``, never overwriting.

    Falls back to copy-then-delete across file systems. The caller makes the rename
    durable with :func:`fsync_dir` on ``target.parent`` (once for many files).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, "target exists", str(target))
    try:
        os.rename(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.moving")
        if os.path.islink(source):
            os.symlink(os.readlink(source), temp)
        elif os.path.isfile(source):
            shutil.copy2(source, temp)
            with open(temp, "rb") as fh:
                os.fsync(fh.fileno())
        if os.path.lexists(temp):  # a device node or pipe cannot be copied: its note stays
            os.rename(temp, target)
        os.unlink(source)


#: Suffix given to a link (or file) found where emix expected one of its folders.
PLANTED_SUFFIX = ".planted"


def quarantine(path: Path, reason: str) -> Path:
    """Rename ``path`` (a link, never followed) aside with a note saying why; return it."""
    aside = path.with_name(f"{path.name}.{secrets.token_hex(4)}{PLANTED_SUFFIX}")
    os.rename(path, aside)  # renames the link itself
    note = aside.with_name(aside.name + ERROR_SUFFIX)
    temp = note.with_name(f".{note.name}.{secrets.token_hex(4)}")
    temp.write_text(f"emix put the link this note is named after aside:\n\n{reason}\n", "utf-8")
    os.replace(temp, note)  # replaces a planted link, never writes through it
    return aside


def real_folder(root: Path, relative: str | PurePosixPath) -> tuple[Path, list[Path]]:
    """``root/relative`` as real folders, created component by component.

    A symbolic link (or a file) planted where one of the folders belongs is never
    followed: it is renamed aside with ``<name>.error.txt`` and a real folder takes its
    place. ``root`` itself comes from ``gateway.toml`` and is trusted.

    :return: the folder, and what was put aside (for the log).
    """
    current, planted = root, []
    for part in PurePosixPath(relative).parts:
        if part in ("", ".", ".."):
            raise UnsafePathError("a folder name would leave its root")
        current = current / part
        for _attempt in range(3):
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                try:
                    os.mkdir(current, 0o750)
                except FileExistsError:
                    continue  # someone was quicker: look again
                break
            if stat.S_ISDIR(st.st_mode):
                break
            planted.append(
                quarantine(
                    current,
                    "a symbolic link or file was found where emix keeps a folder; emix "
                    "never follows links in its folders and put it aside. Check who can "
                    "write into this folder.",
                )
            )
        else:
            raise UnsafePathError("a folder of the gateway keeps being replaced; not written")
    return current, planted


def write_error_note(target: Path, reason: str) -> Path:
    """Write ``<target>.error.txt`` explaining why the file was not sent (atomically)."""
    note = target.with_name(target.name + ERROR_SUFFIX)
    temp = note.with_name(f".{note.name}.{secrets.token_hex(4)}")
    text = (
        "emix did not send the file this note is named after:\n\n"
        f"{reason}\n\n"
        "To try again, fix the problem and move the file back into the drop folder.\n"
    )
    temp.write_text(text, "utf-8")
    os.replace(temp, note)
    return note


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prune_empty_dirs(root: Path, keep_depth: int) -> None:
    """Remove empty folders under ``root`` left by moved files; keep the first
    ``keep_depth`` levels (the recipient folders) and dot-folders."""

    def prune(folder: Path, depth: int) -> bool:
        empty = True
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return False
        for entry in entries:
            if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
                removable = prune(Path(entry.path), depth + 1) and depth + 1 > keep_depth
                if removable and _rmdir(entry.path):
                    continue
            empty = False
        return empty

    prune(root, 0)


def _rmdir(path: str) -> bool:
    try:
        os.rmdir(path)
    except OSError:  # a file arrived meanwhile
        return False
    return True
