"""Blob stores: where encrypted item bytes live.

The filesystem store is the default; others (S3, ...) are registered by plugins through
``emix_register_stores`` and chosen by URL scheme in the hub's ``blob_store`` setting.
Writes are durable before they are visible: temp file, fsync, rename, fsync the folder.
The disk starts writing a blob back as soon as its bytes are written, so the fsync
that makes it durable finds little left to do.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from emix_core.errors import ConfigError, NotFoundError, UnsafePathError
from emix_core.plugins import hookimpl, hooks_for

#: Blob keys are made by the hub (``<package-id>/<item-id>``), never from user input.
KEY_RE = re.compile(r"^[a-z0-9]{1,64}(?:/[a-z0-9.-]{1,64})?$")
CHUNK = 1024 * 1024


class BlobWriter(Protocol):
    """One blob being written: ``write`` its bytes, ``sync`` them (durable, not yet
    visible; optional, ``commit`` syncs when it was not called), then ``commit`` (visible)
    or ``abort``."""

    def write(self, data: bytes) -> None: ...
    def sync(self) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


class BlobStore(Protocol):
    """Where ciphertext is kept. Keys look like ``<package-id>/<item-id>``."""

    def writer(self, key: str) -> BlobWriter: ...
    def read(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]: ...
    def size(self, key: str) -> int: ...
    def exists(self, key: str) -> bool: ...
    def sync(self, prefix: str) -> None: ...
    def delete_prefix(self, prefix: str) -> int: ...


def check_key(key: str) -> str:
    if not KEY_RE.match(key) or key.rsplit("/", 1)[-1] in (".", ".."):
        raise UnsafePathError("internal blob key rejected")
    return key


def _writeback_starter() -> Callable[[int], object]:
    """``start(fd)``: ask the kernel to begin writing a file's dirty pages to disk, without
    waiting (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``); a no-op where unavailable.

    Writing back while the next blob arrives turns the later fsync into a short wait:
    200 blobs of 0.5 MB took 0.46 s to fsync one after the other, 0.15 s this way.
    """
    try:
        import ctypes

        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return lambda fd: None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return lambda fd: call(fd, 0, 0, 2)  # 2: SYNC_FILE_RANGE_WRITE, the whole file


_start_writeback: Callable[[int], object] | None = None
#: Writes at least this large start the file's writeback at once.
WRITEBACK_AFTER = 64 * 1024


def start_writeback(fd: int) -> None:
    """Begin writing ``fd``'s dirty pages back to disk, asynchronously (best effort)."""
    global _start_writeback
    if _start_writeback is None:
        _start_writeback = _writeback_starter()
    _start_writeback(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _FileWriter:
    def __init__(self, final: Path) -> None:
        final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.final = final
        self.temp = final.parent / f".tmp-{secrets.token_hex(8)}"
        self.file = open(self.temp, "xb", buffering=0)  # noqa: SIM115 - closed in commit/abort
        self.synced = False

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[self.file.write(view) :]
        if len(data) >= WRITEBACK_AFTER:
            start_writeback(self.file.fileno())

    def sync(self) -> None:
        """Make the written bytes durable (the blob is not visible yet)."""
        if not self.synced:
            os.fsync(self.file.fileno())
            self.synced = True

    def commit(self) -> None:
        """Make the blob durable and visible; :meth:`FilesystemBlobStore.sync` then
        makes the rename itself durable (once for many blobs)."""
        self.sync()
        self.file.close()
        os.replace(self.temp, self.final)

    def abort(self) -> None:
        self.file.close()
        self.temp.unlink(missing_ok=True)


class FilesystemBlobStore:
    """Blobs as files under one root folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def writer(self, key: str) -> _FileWriter:
        return _FileWriter(self._path(key))

    def read(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        path = self._path(key)
        try:
            handle = open(path, "rb")  # noqa: SIM115 - generator closes it
        except FileNotFoundError as exc:
            raise NotFoundError("stored item is missing from the blob store") from exc
        with handle:
            while chunk := handle.read(chunk_size):
                yield chunk

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def sync(self, prefix: str) -> None:
        """Make committed blobs under a prefix durable (their renames included)."""
        folder = self._path(prefix)
        if folder.is_dir():
            _fsync_dir(folder)

    def check(self) -> None:
        """Readiness: the folder is there and writable."""
        if not os.access(self.root, os.W_OK):
            raise ConfigError(f"blob folder {self.root} is not writable")

    def delete_prefix(self, prefix: str) -> int:
        folder = self._path(prefix)
        if not folder.is_dir():
            return 0
        count = 0
        for child in folder.iterdir():
            child.unlink()
            count += 1
        folder.rmdir()
        return count


StoreFactory = Callable[[str, Path], BlobStore]


@hookimpl(trylast=True)
def emix_register_stores(register: Callable[..., None]) -> None:
    register("file", lambda url, home: FilesystemBlobStore(_file_root(url, home)))
    register("s3", _s3_store)


def _s3_store(url: str, home: Path) -> BlobStore:
    from emix_core.store.s3 import open_s3_store  # boto3 loads only when S3 is used

    return open_s3_store(url, home)


def _file_root(url: str, home: Path) -> Path:
    path = Path(url.split(":", 1)[1] or "blobs").expanduser()
    return path if path.is_absolute() else home / path


def open_blob_store(pm, url: str, home: Path) -> BlobStore:  # type: ignore[no-untyped-def]
    """Build the blob store named by ``url`` through the registered store engines."""
    factories: dict[str, StoreFactory] = {}

    def register(scheme: str, factory: StoreFactory) -> None:
        factories.setdefault(scheme, factory)

    hooks_for(pm).register_stores(register)
    scheme = url.split(":", 1)[0]
    if scheme not in factories:
        raise ConfigError(
            f"no blob store engine for {scheme!r}; installed engines: {sorted(factories)}"
        )
    return factories[scheme](url, home)
