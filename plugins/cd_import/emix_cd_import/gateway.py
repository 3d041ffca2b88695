"""Gateway source of kind ``cd``: a CD import station.

A folder is watched where disc images (``.iso``, raw images, zips) are dropped or where
media appear mounted (a sub-folder per disc). Once an entry has settled (unchanged for
``settle_seconds``) it is imported like ``emix cd import``: shared with the recipients,
or stored into the PACS. An image file then moves to ``done/`` or, when something on it
was wrong, to ``failed/`` with ``<name>.error.txt`` saying why (the good studies were
still imported). A mounted medium cannot be moved: it is remembered in the journal and
imported again only when its content changes. A hub or PACS that is down is retried.

.. code-block:: toml

    [[sources]]
    kind = "cd"
    path = "/srv/emix/cd-station"
    to = "lakeside"            # or: pacs = "https://pacs/dicom-web"
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emix_core import (
    ConfigError,
    EmixError,
    HubUnavailable,
    JournalConnections,
    log_event,
    retry_delay,
    time_now,
)

if TYPE_CHECKING:
    from emix_core import Gateway

__all__ = ["CdSource", "SOURCE_SETTINGS"]

log = logging.getLogger("emix.cd")

#: Every setting of a ``[[sources]]`` table of kind ``cd``.
SOURCE_SETTINGS = {
    "kind": '"cd"',
    "name": "name shown in logs and status",
    "path": "the folder where disc images are dropped or media appear mounted",
    "to": "recipient address, or a list of them (share through the hub)",
    "pacs": "DICOMweb base URL of the PACS to store into instead",
    "pacs_username": "PACS basic auth user",
    "pacs_password_env": "environment variable holding the PACS password",
    "settle_seconds": "import an entry once unchanged for this long (default 10)",
    "poll_seconds": "how often the folder is listed (default 2)",
    "done": "where imported image files go (default: <path>/done)",
    "failed": "where image files with problems go (default: <path>/failed)",
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS media (
    key TEXT PRIMARY KEY,          -- SHA-256 of the entry's name and signature: no name at rest
    state TEXT NOT NULL,           -- done, failed, waiting
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    package_id TEXT,
    error TEXT,
    finished REAL
);
"""


def _signature(path: Path) -> tuple[Any, ...]:
    st = path.stat()
    if path.is_dir():
        names = sorted(os.listdir(path))
        listing = hashlib.sha256("\x00".join(names).encode("utf-8", "replace")).hexdigest()
        return ("dir", st.st_mtime_ns, len(names), listing)
    return ("file", st.st_size, st.st_mtime_ns)


class CdSource:
    """Import every disc image or mounted medium that appears in a folder."""

    def __init__(self, settings: dict[str, Any], gateway: Gateway) -> None:
        unknown = sorted(set(settings) - set(SOURCE_SETTINGS))
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r} in a cd source")
        self.name = str(settings["name"])
        self.gateway = gateway
        if not settings.get("path"):
            raise ConfigError(f'cd source {self.name!r} needs path = "folder to watch"')
        self.path = gateway.resolve_path(settings["path"])
        to = settings.get("to")
        self.to = [to] if isinstance(to, str) else list(to or [])
        self.pacs_url = str(settings.get("pacs") or "")
        if bool(self.to) == bool(self.pacs_url):
            raise ConfigError(f"cd source {self.name!r} needs either to = ... or pacs = ...")
        self.pacs_username = str(settings.get("pacs_username", ""))
        self.pacs_password_env = str(settings.get("pacs_password_env", ""))
        self.settle_seconds = float(settings.get("settle_seconds", 10))
        self.poll_seconds = float(settings.get("poll_seconds", 2))
        self.done_dir = gateway.resolve_path(settings.get("done") or self.path / "done")
        self.failed_dir = gateway.resolve_path(settings.get("failed") or self.path / "failed")
        safe = hashlib.sha256(self.name.encode()).hexdigest()[:16]
        self.journal = JournalConnections(gateway.state_dir / f"cd-{safe}.db", SCHEMA)
        self._seen: dict[str, tuple[tuple[Any, ...], float]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error = ""

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name=f"cd-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    def queue_depths(self) -> dict[str, int]:
        """Media whose import is to be tried again (``pending``, all ``retrying``: the hub
        or the PACS was unreachable) and media moved to ``failed/``."""
        counts = dict(
            self.journal.get().execute("SELECT state, COUNT(*) FROM media GROUP BY state")
        )
        waiting = counts.get("waiting", 0)
        return {
            "pending": waiting,
            "in_flight": 0,
            "failed": counts.get("failed", 0),
            "retrying": waiting,
        }

    def status(self) -> dict[str, Any]:
        db = self.journal.get()
        counts = dict(db.execute("SELECT state, COUNT(*) FROM media GROUP BY state").fetchall())
        return {
            "kind": "cd",
            "path": str(self.path),
            "pending": len(self._seen),
            "done": counts.get("done", 0),
            "failed": counts.get("failed", 0),
            "waiting": counts.get("waiting", 0),
            "last_error": self._last_error,
        }

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # the loop must survive anything a medium does
                self._last_error = f"{type(exc).__name__}"
                log_event(
                    log, "cd.error", logging.ERROR, source=self.name, error=type(exc).__name__
                )
            self._stop.wait(self.poll_seconds)

    # ------------------------------------------------------------------ work
    def _key(self, entry: Path, signature: tuple[Any, ...]) -> str:
        return hashlib.sha256(repr((entry.name, signature)).encode()).hexdigest()

    def tick(self) -> None:
        """One round: note new or changed entries, import those that settled."""
        now = time_now()
        present = set()
        for entry in sorted(self.path.iterdir()):
            if entry.name.startswith(".") or entry in (self.done_dir, self.failed_dir):
                continue
            if entry.name.endswith(".error.txt"):
                continue
            present.add(entry.name)
            try:
                signature = _signature(entry)
            except OSError:
                continue
            previous = self._seen.get(entry.name)
            if previous is None or previous[0] != signature:
                self._seen[entry.name] = (signature, now)
                continue
            if now - previous[1] < self.settle_seconds:
                continue
            key = self._key(entry, signature)
            row = self.journal.get().execute("SELECT * FROM media WHERE key = ?", (key,)).fetchone()
            if row is not None and (
                row["state"] in ("done", "failed") or row["next_attempt"] > now
            ):
                continue
            self._import(entry, key, row["attempts"] if row is not None else 0)
        for gone in set(self._seen) - present:
            del self._seen[gone]

    def _pacs(self) -> Any:
        from emix_cd_import.dicomweb import pacs_settings

        password = os.environ.get(self.pacs_password_env, "") if self.pacs_password_env else ""
        return pacs_settings(self.pacs_url, username=self.pacs_username, password=password)

    def _import(self, entry: Path, key: str, attempts: int) -> None:
        from emix_cd_import.importer import import_medium

        db = self.journal.get()
        try:
            result = import_medium(
                entry,
                home=self.gateway.home,
                to=self.to,
                client=self.gateway.client if self.to else None,
                pacs=self._pacs() if self.pacs_url else None,
                work_dir=self.gateway.state_dir,
                parallel=self.gateway.parallel,
            )
        except HubUnavailable as exc:
            self._wait(db, key, attempts, exc.message)
            return
        except EmixError as exc:
            self._finish(db, entry, key, "failed", None, exc.message)
            return
        except OSError as exc:
            self._wait(db, key, attempts, f"cannot read the medium ({exc.strerror})")
            return
        if result.pacs is not None and not result.imported and result.failed:
            self._wait(db, key, attempts, "the PACS stored nothing")
            return
        problems = [p.message for p in result.catalog.problems + result.failed]
        state = "done" if result.complete else "failed"
        if not result.catalog.instances:
            problems.append("no DICOM instance was found on the medium")
        self._finish(db, entry, key, state, result.package_id, "\n".join(problems))

    def _wait(self, db: Any, key: str, attempts: int, error: str) -> None:
        attempts += 1
        self._last_error = error
        db.execute(
            "INSERT INTO media (key, state, attempts, next_attempt, error) "
            "VALUES (?, 'waiting', ?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
            "attempts = excluded.attempts, next_attempt = excluded.next_attempt, "
            "error = excluded.error",
            (key, attempts, time_now() + retry_delay(attempts), error),
        )
        log_event(log, "cd.retry", logging.WARNING, source=self.name, attempts=attempts)

    def _finish(
        self, db: Any, entry: Path, key: str, state: str, package_id: str | None, error: str
    ) -> None:
        db.execute(
            "INSERT INTO media (key, state, package_id, error, finished) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET state = excluded.state, "
            "package_id = excluded.package_id, error = excluded.error, "
            "finished = excluded.finished",
            (key, state, package_id, error, time_now()),
        )
        self._seen.pop(entry.name, None)
        log_event(log, "cd.imported", source=self.name, state=state, package=package_id)
        if entry.is_dir():
            return  # a mounted medium stays where it is; the journal remembers it
        target_dir = self.done_dir if state == "done" else self.failed_dir
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / entry.name
        if target.exists():
            target = target_dir / f"{entry.stem}-{key[:8]}{entry.suffix}"
        shutil.move(str(entry), target)
        if error:
            target.with_name(target.name + ".error.txt").write_text(error + "\n", "utf-8")
