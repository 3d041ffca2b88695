"""Resume state of interrupted sends, kept in the facility home (``sending/``).

A send is identified by what was asked (paths, recipients, expiry, hub); its state
records the open package and a fingerprint of the files (path, size, mtime). Running the
same ``emix send`` again finds it and uploads only what the hub does not hold yet.
Nothing here holds PHI beyond the local paths the user typed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FOLDER = "sending"


def send_key(paths: Sequence[Path], to: Sequence[str], expires_days: int | None, hub: str) -> str:
    """A stable name for one send request."""
    ask = {
        "paths": sorted(str(Path(p).resolve()) for p in paths),
        "to": sorted(t.lower() for t in to),
        "expires_days": expires_days,
        "hub": hub.rstrip("/"),
    }
    return hashlib.sha256(json.dumps(ask, sort_keys=True).encode()).hexdigest()[:32]


def files_fingerprint(paths: Sequence[Path]) -> str:
    """Changes when any file is added, removed, resized or modified."""
    digest = hashlib.sha256()
    for path in paths:
        info = path.stat()
        digest.update(f"{path}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class ResumeStore:
    """The ``sending/`` folder of a facility home."""

    def __init__(self, home: Path) -> None:
        self.folder = home / FOLDER

    def load(self, key: str) -> dict[str, Any] | None:
        file = self.folder / f"{key}.json"
        try:
            return json.loads(file.read_text("utf-8"))
        except (OSError, ValueError):
            return None

    def save(self, key: str, package_id: str, fingerprint: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        file = self.folder / f"{key}.json"
        temp = file.with_suffix(".tmp")
        temp.write_text(json.dumps({"package_id": package_id, "files": fingerprint}), "utf-8")
        os.replace(temp, file)

    def forget(self, key: str) -> None:
        (self.folder / f"{key}.json").unlink(missing_ok=True)

    def forget_package(self, package_id: str) -> int:
        """Drop every state that points at a package; return how many."""
        count = 0
        for file in self.folder.glob("*.json") if self.folder.exists() else []:
            try:
                if json.loads(file.read_text("utf-8")).get("package_id") == package_id:
                    file.unlink()
                    count += 1
            except (OSError, ValueError):
                continue
        return count
