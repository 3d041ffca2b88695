"""Blob stores: where encrypted item bytes live.

The filesystem store is the default; others (S3, ...) are registered by plugins through
``emix_register_stores`` and chosen by URL scheme in the hub's ``blob_store`` setting.
Writes are durable before they are visible: temp file, fsync, rename, fsync the folder.
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
    def write(self, data: bytes) -> None: ...
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
        self.file = open(self.temp, "xb")  # noqa: SIM115 - closed in commit/abort

    def write(self, data: bytes) -> None:
        self.file.write(data)

    def commit(self) -> None:
        """Make the blob durable and visible; :meth:`FilesystemBlobStore.sync` then
        makes the rename itself durable (once for many blobs)."""
        self.file.flush()
        os.fsync(self.file.fileno())
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
