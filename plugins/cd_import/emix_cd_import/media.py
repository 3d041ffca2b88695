"""A patient's medium, opened read-only and never mounted: a folder, a disc image or a zip.

Every kind lists its files with a *key* for matching DICOMDIR references (upper case,
``;1`` version and trailing dots stripped, ``/`` separators) and opens one file as a
stream. Nothing on a medium is executed, and nothing is extracted by the name it
carries: links are reported and never followed, zip entries that would escape are
refused, zip bombs are stopped by a ratio and a total size cap.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import stat
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, BinaryIO, cast

from emix_core import InvalidInput, PayloadTooLarge, UnsafePathError

__all__ = [
    "Limits",
    "Medium",
    "MediumFile",
    "Problem",
    "match_key",
    "open_medium",
]

SECTOR = 2048
RAW_SECTOR = 2352
RAW_SYNC = b"\x00" + b"\xff" * 10 + b"\x00"
ISO_MAGIC = b"CD001"
#: Names of files that would start programs: reported, never run, never copied.
AUTORUN_NAMES = frozenset({"AUTORUN.INF", "AUTORUN.EXE", "AUTORUN.BAT", "AUTORUN.SH"})
PROGRAM_SUFFIXES = frozenset(
    {
        ".EXE", ".DLL", ".COM", ".BAT", ".CMD", ".MSI", ".SCR", ".VBS", ".PS1", ".JAR",
        ".SH", ".APP", ".DYLIB", ".SO", ".LNK", ".PIF", ".CPL", ".JS", ".HTA", ".WSF",
    }
)  # fmt: skip


@dataclass
class Limits:
    """Caps on what a medium may make emix read.

    :param max_files: most files listed on one medium.
    :param max_depth: deepest folder nesting followed.
    :param max_total_bytes: most bytes a zip may unpack to, all entries together.
    :param max_ratio: largest compression ratio of a zip entry over 1 MiB.
    :param max_dicomdir_bytes: largest DICOMDIR read.
    """

    max_files: int = 200_000
    max_depth: int = 16
    max_total_bytes: int = 64 * 1024**3
    max_ratio: float = 200.0
    max_dicomdir_bytes: int = 64 * 1024**2


@dataclass
class Problem:
    """Something wrong or notable on a medium, in words a PACS administrator acts on.

    :param code: ``missing-file``, ``unsafe-path``, ``dicomdir-loop``, ``program`` ...
    :param message: what it means (no PHI).
    :param where: the path on the medium it concerns, if any (shown to the operator only).
    """

    code: str
    message: str
    where: str = ""

    def to_dict(self) -> dict[str, str]:
        out = {"code": self.code, "message": self.message}
        if self.where:
            out["where"] = self.where
        return out


@dataclass
class MediumFile:
    """One regular file on a medium."""

    path: str
    size: int
    ref: Any = None  # how the medium finds it again

    @property
    def key(self) -> str:
        return match_key(self.path)


def match_key(path: str) -> str:
    """The key a path and a ReferencedFileID are matched by: ``dicom/im1.;1`` -> ``DICOM/IM1``."""
    parts = []
    for part in PurePosixPath(path).parts:
        part = re.sub(r";\d*$", "", part).rstrip(".").upper()
        if part and part != "/":
            parts.append(part)
    return "/".join(parts)


def is_program(path: str) -> bool:
    name = PurePosixPath(path).name.upper()
    name = re.sub(r";\d*$", "", name).rstrip(".")
    return name in AUTORUN_NAMES or PurePosixPath(name).suffix in PROGRAM_SUFFIXES


@dataclass
class Medium:
    """A medium's files and what was found wrong while listing them."""

    kind: str
    files: list[MediumFile] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    programs: list[str] = field(default_factory=list)

    def by_key(self) -> dict[str, MediumFile]:
        return {f.key: f for f in self.files}

    def shown(self, path: str) -> str:
        """How a path on the medium is named in problems and listings."""
        return path

    def open(self, file: MediumFile) -> BinaryIO:  # pragma: no cover - overridden
        raise NotImplementedError

    def close(self) -> None:
        """Release the medium (image file, archive)."""

    def __enter__(self) -> Medium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add(self, path: str, size: int, ref: Any, limits: Limits) -> None:
        if is_program(path):
            self.programs.append(self.shown(path))
            return
        if len(self.files) >= limits.max_files:
            raise PayloadTooLarge(f"the medium holds more than {limits.max_files} files")
        self.files.append(MediumFile(path, size, ref))


# --------------------------------------------------------------------------- folder


class FolderMedium(Medium):
    """A mounted disc, a USB stick or a copied folder.

    A link is never followed out of the folder: it is reported (``link``) and left out.
    A link to a file inside the folder is read as that file, and a link to a folder inside
    it is skipped quietly (what it holds is read where it really is). That is how a folder
    emix received carries its DICOMDIR (``DIRLINKS/PT…/IM…`` links to ``DICOM/…``), so that
    such a folder reads cleanly, with its index.
    """

    def __init__(self, root: Path, limits: Limits) -> None:
        super().__init__("folder")
        self.root = root
        self._real_root = root.resolve()
        for current, folders, names in os.walk(root, followlinks=False):
            relative = Path(current).relative_to(root)
            if len(relative.parts) >= limits.max_depth:
                folders[:] = []
                self.problems.append(
                    Problem("too-deep", "folders nested too deeply were not read", str(relative))
                )
                continue
            for name in sorted(folders):
                path = Path(current) / name
                if path.is_symlink() and self._inside(path) is None:
                    self._link(relative / name)
            folders[:] = sorted(f for f in folders if not (Path(current) / f).is_symlink())
            for name in sorted(names):
                path = Path(current) / name
                st = path.lstat()
                if stat.S_ISLNK(st.st_mode):
                    target = self._inside(path)
                    if target is None:
                        self._link(relative / name)
                    elif target.is_file():
                        size = target.stat().st_size
                        self._add((relative / name).as_posix(), size, target, limits)
                elif stat.S_ISREG(st.st_mode):
                    self._add((relative / name).as_posix(), st.st_size, path, limits)

    def _inside(self, link: Path) -> Path | None:
        """Where ``link`` leads, when that is inside the folder (no link on the way out)."""
        try:
            target = link.resolve(strict=True)
        except (OSError, RuntimeError):  # dangling, or a loop of links
            return None
        if target == self._real_root or not target.is_relative_to(self._real_root):
            return None
        return target

    def _link(self, relative: Path) -> None:
        self.problems.append(
            Problem("link", "a link on the medium was not followed", relative.as_posix())
        )

    def open(self, file: MediumFile) -> BinaryIO:
        fd = os.open(file.ref, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        return os.fdopen(fd, "rb")


# --------------------------------------------------------------------------- disc image


class RawSectors(io.RawIOBase):
    """The 2048-byte user data of a raw (2352 bytes a sector) disc image, as a stream."""

    def __init__(self, raw: BinaryIO, data_offset: int) -> None:
        self.raw = raw
        self.data_offset = data_offset
        raw.seek(0, os.SEEK_END)
        self.length = raw.tell() // RAW_SECTOR * SECTOR
        self.position = 0
        self.mode = "rb"

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.position, 2: self.length}[whence]
        self.position = max(0, base + offset)
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self.position < self.length:
            sector, within = divmod(self.position, SECTOR)
            take = min(SECTOR - within, len(view) - done, self.length - self.position)
            self.raw.seek(sector * RAW_SECTOR + self.data_offset + within)
            chunk = self.raw.read(take)
            if not chunk:
                break
            view[done : done + len(chunk)] = chunk
            done += len(chunk)
            self.position += len(chunk)
        return done


def disc_image_layout(fp: BinaryIO) -> int | None:
    """``0`` for a 2048-byte-sector image (.iso), the data offset in a raw 2352-byte
    sector image (.bin, raw dump), ``None`` when the bytes are no ISO 9660 image."""
    fp.seek(16 * SECTOR + 1)
    if fp.read(5) == ISO_MAGIC:
        return 0
    for data_offset in (16, 24):  # mode 1; mode 2 form 1
        fp.seek(16 * RAW_SECTOR)
        header = fp.read(16)
        fp.seek(16 * RAW_SECTOR + data_offset + 1)
        if header[:12] == RAW_SYNC and fp.read(5) == ISO_MAGIC:
            return data_offset
    return None


class DiscImage(Medium):
    """An ISO 9660 image (Joliet and Rock Ridge names used when present), read with pycdlib."""

    def __init__(self, path: Path, limits: Limits) -> None:
        super().__init__("iso")
        import pycdlib
        from pycdlib.pycdlibexception import PyCdlibException

        self.fp: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed by close()
        try:
            data_offset = disc_image_layout(self.fp)
            if data_offset is None:
                raise InvalidInput("the file is not a disc image (no ISO 9660 volume in it)")
            stream: BinaryIO = self.fp
            if data_offset:
                self.kind = "raw-disc-image"
                stream = RawSectors(self.fp, data_offset)  # type: ignore[assignment]
            self.iso = pycdlib.PyCdlib()
            try:
                self.iso.open_fp(stream)
            except (PyCdlibException, ValueError, struct.error, IndexError) as exc:
                raise InvalidInput(
                    "the disc image is damaged: its ISO 9660 directory cannot be read"
                ) from exc
            if self.iso.has_rock_ridge():
                self.namespace = "rr_path"
            elif self.iso.has_joliet():
                self.namespace = "joliet_path"
            else:
                self.namespace = "iso_path"
            try:
                self._walk("/", 0, limits)
            except (PyCdlibException, ValueError, IndexError) as exc:
                raise InvalidInput("the disc image is damaged: a folder cannot be read") from exc
        except BaseException:
            self.fp.close()
            raise

    def _name(self, record: Any) -> str:
        if self.namespace == "rr_path" and record.rock_ridge is not None:
            name = record.rock_ridge.name()
            return name.decode("utf-8", "replace")
        raw = record.file_identifier()
        if self.namespace == "joliet_path":
            return raw.decode("utf-16-be", "replace")
        return raw.decode("ascii", "replace")

    def _path(self, record: Any, folder: str) -> tuple[str, str]:
        """The path shown for a record (no ``;1``) and the one pycdlib finds it by."""
        name = self._name(record)
        ref = f"{folder.rstrip('/')}/{name}"
        if self.namespace == "iso_path":
            name = re.sub(r";\d*$", "", name).rstrip(".") if not record.is_dir() else name
        return f"{folder.rstrip('/')}/{name}", ref

    def _walk(self, folder: str, depth: int, limits: Limits) -> None:
        if depth >= limits.max_depth:
            self.problems.append(Problem("too-deep", "folders nested too deeply were not read"))
            return
        for record in self.iso.list_children(**{self.namespace: folder}):
            if record is None or record.is_dot() or record.is_dotdot():
                continue
            name = self._name(record)
            if not name or "/" in name or name in (".", "..") or "\x00" in name:
                self.problems.append(Problem("unsafe-path", "a file name on the disc is unusable"))
                continue
            path, ref = self._path(record, folder)
            rock_ridge = record.rock_ridge if self.namespace == "rr_path" else None
            if rock_ridge is not None and rock_ridge.is_symlink():
                target = rock_ridge.symlink_path().decode("utf-8", "replace")
                where = "outside the disc" if _escapes(path, target) else "on the disc"
                self.problems.append(
                    Problem("link", f"a link pointing {where} was not followed", path[1:])
                )
                continue
            if record.is_dir():
                self._walk(ref, depth + 1, limits)
            elif record.is_file():
                self._add(path[1:], record.get_data_length(), ref, limits)

    def open(self, file: MediumFile) -> BinaryIO:
        return cast(BinaryIO, self.iso.open_file_from_iso(**{self.namespace: file.ref}))

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a damaged image must not hide why
            self.iso.close()
        self.fp.close()


def _escapes(path: str, target: str) -> bool:
    if target.startswith("/"):
        return True
    depth = len(PurePosixPath(path).parent.parts) - 1
    for part in PurePosixPath(target).parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            return True
    return False


# --------------------------------------------------------------------------- zip


def check_member_name(name: str) -> str:
    """A zip entry name made safe to list, or :class:`UnsafePathError` (zip slip)."""
    if "\\" in name or "\x00" in name:
        raise UnsafePathError("an archive entry name holds a backslash or a NUL")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise UnsafePathError("an archive entry name is an absolute path")
    if any(part == ".." for part in name.split("/")):
        raise UnsafePathError("an archive entry name climbs out of the archive (..)")
    return name


class ZipMedium(Medium):
    """A zip archive (a USB stick's content, a download). Entries are streamed, never
    extracted by name; unsafe names and bombs are refused entry by entry."""

    def __init__(self, path: Path, limits: Limits) -> None:
        super().__init__("zip")
        try:
            self.archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, ValueError):
            raise InvalidInput("the archive is damaged or not a zip file") from None
        #: entry name -> its number in the archive's listing (1-based, as ``unzip -l``)
        self.numbers: dict[str, int] = {}
        total = 0
        for number, info in enumerate(self.archive.infolist(), start=1):
            self.numbers.setdefault(info.filename, number)
            if info.is_dir():
                continue
            try:
                name = check_member_name(info.filename)
            except UnsafePathError as exc:
                self.problems.append(Problem("unsafe-path", exc.message, self.shown(info.filename)))
                continue
            if len(PurePosixPath(name).parts) > limits.max_depth:
                shown = self.shown(name)
                self.problems.append(Problem("too-deep", "entry nested too deeply", shown))
                continue
            ratio = info.file_size / max(info.compress_size, 1)
            if info.file_size > 1024 * 1024 and ratio > limits.max_ratio:
                self.problems.append(
                    Problem(
                        "zip-bomb",
                        f"an entry compresses {ratio:.0f} to 1 (more than "
                        f"{limits.max_ratio:.0f}): refused as a likely zip bomb",
                        self.shown(name),
                    )
                )
                continue
            total += info.file_size
            if total > limits.max_total_bytes:
                self.archive.close()
                raise PayloadTooLarge(
                    f"the archive unpacks to more than {limits.max_total_bytes} bytes"
                )
            self._add(name, info.file_size, info, limits)

    def shown(self, path: str) -> str:
        """An entry by its number and a digest of its name: entry names are chosen by
        whoever made the archive and often carry the patient's name (``SMITH_JOHN.dcm``)."""
        digest = hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:12]
        number = self.numbers.get(path)
        return f"zip entry #{number} (name sha256 {digest})" if number else f"name sha256 {digest}"

    def open(self, file: MediumFile) -> BinaryIO:
        # zipfile stops at the size the entry declares and checks its CRC at the end,
        # so an entry that lies about its size cannot unpack to more
        try:
            stream = self.archive.open(file.ref)
        except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError):
            raise InvalidInput(f"{self.shown(file.path)} cannot be read: damaged") from None
        return _Entry(stream, self.shown(file.path))  # type: ignore[return-value]

    def close(self) -> None:
        self.archive.close()


class _Entry(io.RawIOBase):
    """A zip entry's stream whose errors name the entry by number, never by name
    (zipfile's own messages quote the name: ``Bad CRC-32 for file 'SMITH_JOHN.dcm'``)."""

    def __init__(self, stream: IO[bytes], shown: str) -> None:
        super().__init__()
        self._stream = stream
        self._shown = shown

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        try:
            return self._stream.read(size)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as exc:
            raise InvalidInput(
                f"{self._shown} is damaged ({type(exc).__name__}); the rest of the archive was read"
            ) from None

    def seekable(self) -> bool:
        return bool(self._stream.seekable())

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        try:
            return int(self._stream.seek(offset, whence))
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as exc:
            raise InvalidInput(f"{self._shown} is damaged ({type(exc).__name__})") from None

    def tell(self) -> int:
        return int(self._stream.tell())

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._stream.close()
        super().close()


# --------------------------------------------------------------------------- opening


def open_medium(source: Path, limits: Limits | None = None) -> Medium:
    """Open a folder, a disc image (.iso, raw image) or a zip archive, by its content.

    :raises InvalidInput: the source is none of these (or is damaged).
    :raises PayloadTooLarge: the medium exceeds a limit of ``limits``.
    """
    limits = limits or Limits()
    source = Path(source)
    if source.is_dir():
        return FolderMedium(source, limits)
    if not source.is_file():
        raise InvalidInput("the source is neither a folder nor a file that can be read")
    with open(source, "rb") as fp:
        head = fp.read(4)
        layout = disc_image_layout(fp)
    if layout is not None:
        return DiscImage(source, limits)
    if head[:2] == b"PK" or zipfile.is_zipfile(source):
        return ZipMedium(source, limits)
    raise InvalidInput(
        "the source is not a disc image (ISO 9660), a zip archive or a folder; "
        "a disc must be given as its image or its mounted folder"
    )


def iter_chunks(stream: BinaryIO, size: int = 1024 * 1024) -> Iterator[bytes]:
    while chunk := stream.read(size):
        yield chunk
