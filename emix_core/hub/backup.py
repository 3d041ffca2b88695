"""``emix hub backup`` and ``emix hub restore``: a consistent copy of a hub's home.

The metadata and audit databases are copied with SQLite's online backup API, so a hub
may keep serving meanwhile. The metadata snapshot is taken first, then the blobs: items
are written before they are recorded, so every item the snapshot lists is in the copy.
Keys and ``emix.toml`` are copied as they are (mode 0600): a backup is as secret as the
hub itself — store it encrypted, and apart from the key escrow.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

from emix_core import __version__
from emix_core.config import CONFIG_NAME, load_config
from emix_core.errors import ConfigError

MANIFEST = "emix-backup.json"
DATABASES = ("metadata.db", "audit.db")


def _sqlite_copy(source: Path, target: Path) -> None:
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    try:
        dst = sqlite3.connect(target)
        try:
            with dst:
                src.backup(dst, pages=1024, sleep=0.01)
        finally:
            dst.close()
    finally:
        src.close()
    target.chmod(0o600)


def _copy_tree(source: Path, target: Path) -> tuple[int, int]:
    files = size = 0
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        dest = target / relative
        if path.is_dir() and not path.is_symlink():
            dest.mkdir(parents=True, exist_ok=True, mode=0o700)
        elif path.is_file() and not path.is_symlink():
            dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                shutil.copy2(path, dest)
            except FileNotFoundError:  # purged meanwhile
                continue
            files += 1
            size += dest.stat().st_size
    return files, size


def backup_hub(home: Path, target: Path) -> dict[str, Any]:
    """Copy a hub home into ``target`` (a new or empty folder); return the manifest."""
    config = load_config(home)
    if not (home / "keys" / "kek.key").exists():
        raise ConfigError(f"{home} is not a hub home (no keys/kek.key)")
    if config.hub.database_url and not config.hub.database_url.startswith("sqlite"):
        raise ConfigError(
            "the metadata database is not SQLite: back it up with its own tools (pg_dump), "
            "then run this for keys, config and blobs"
        )
    if target.exists() and any(target.iterdir()):
        raise ConfigError(f"{target} is not empty; back up into a new folder")
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    started = time.time()
    for name in DATABASES[:1]:
        _sqlite_copy(home / name, target / name)
    blobs: dict[str, int] = {"files": 0, "bytes": 0}
    if config.hub.blob_store.startswith("file:"):
        folder = home / config.hub.blob_store.removeprefix("file:")
        if folder.is_dir():
            blobs["files"], blobs["bytes"] = _copy_tree(folder, target / "blobs")
    if (home / "audit.db").exists():
        _sqlite_copy(home / "audit.db", target / "audit.db")
    _copy_tree(home / "keys", target / "keys")
    for key in (target / "keys").glob("*"):
        key.chmod(0o600)
    shutil.copy2(home / CONFIG_NAME, target / CONFIG_NAME)
    (target / CONFIG_NAME).chmod(0o600)
    manifest = {
        "format": "emix-hub-backup/1",
        "emix_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 3),
        "blob_store": config.hub.blob_store,
        "blobs": blobs,
    }
    (target / MANIFEST).write_text(json.dumps(manifest, indent=2), "utf-8")
    return manifest


def restore_hub(source: Path, home: Path) -> dict[str, Any]:
    """Lay a backup out as a new hub home (which must not exist or be empty)."""
    manifest_file = source / MANIFEST
    if not manifest_file.is_file():
        raise ConfigError(f"{source} is not an emix hub backup (no {MANIFEST})")
    manifest = json.loads(manifest_file.read_text("utf-8"))
    if home.exists() and any(home.iterdir()):
        raise ConfigError(f"{home} is not empty; restore into a new folder")
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    home.chmod(0o700)
    for name in (*DATABASES, CONFIG_NAME):
        if (source / name).exists():
            shutil.copy2(source / name, home / name)
            os.chmod(home / name, 0o600)
    _copy_tree(source / "keys", home / "keys")
    if (source / "blobs").is_dir():
        folder = home / str(manifest.get("blob_store", "file:blobs")).removeprefix("file:")
        _copy_tree(source / "blobs", folder)
    (home / "logs").mkdir(exist_ok=True, mode=0o700)
    from emix_core.hub.context import open_hub

    hub = open_hub(home)  # proves the restored home opens: keys, database, audit log
    ok, reason = _verify_audit(hub)
    return {**manifest, "home": str(home), "audit_ok": ok, "audit": reason}


def _verify_audit(hub: Any) -> tuple[bool, str]:
    result = hub.audit_log.verify()
    return result.ok, result.reason
