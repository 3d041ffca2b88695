"""Where received instances wait, durably, until their study is sent: the spool and
its journal.

An instance is acknowledged (C-STORE success) only after :meth:`Spool.keep` returned:
the file is in the spool folder, fsynced, and its row committed in the journal. Rows
are grouped by study and recipients; a *batch* takes every waiting row of a group and
becomes one package. Every step is journaled before it is acted upon:

``waiting`` (row, no batch) → batch ``sending`` (package id noted when the hub gives
one) → ``sealing`` (noted just before the seal request) → ``sent`` (files removed).

After ``kill -9`` a batch still ``sending`` is sent again in a new package (the hub
never sealed the old one); one ``sealing`` is first looked up on the hub, and counts as
sent when the hub sealed it. A file in the spool without a row was never acknowledged
and is removed. Nothing acknowledged is lost, nothing is sent twice.

Keeping an instance makes three things durable: the file's bytes, its name in the spool
folder and its journal row. They are flushed at the same time (the file system commits
them together, in about the time of one flush instead of three in a row), and the
instance is acknowledged only when all three are. So a row whose file is missing or
shorter after a crash was never acknowledged, and is dropped at start.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emix_core import JournalConnections

__all__ = ["Spool", "Arrival", "StoredInstance", "Batch", "group_key", "fsync_dir"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    id INTEGER PRIMARY KEY,
    group_key TEXT NOT NULL,        -- SHA-256 of study UID and recipients: no UID at rest
    sop_key TEXT NOT NULL,          -- SHA-256 of the SOP Instance UID
    file TEXT NOT NULL,             -- random name inside the spool folder
    size INTEGER NOT NULL,
    arrived REAL NOT NULL,
    batch INTEGER                   -- NULL while waiting
);
CREATE INDEX IF NOT EXISTS instances_group ON instances (group_key, batch);
-- finds an instance sent again without reading every row of its study
CREATE INDEX IF NOT EXISTS instances_sop ON instances (sop_key);
CREATE TABLE IF NOT EXISTS groups (
    key TEXT PRIMARY KEY,
    recipients TEXT NOT NULL,       -- JSON list of addresses
    last_arrival REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY,
    group_key TEXT NOT NULL,
    recipients TEXT NOT NULL,
    state TEXT NOT NULL,            -- sending, sealing, sent
    package_id TEXT,
    instances INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    error TEXT,
    finished REAL
);
"""


def _hash(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8", "replace") + b"\0")
    return digest.hexdigest()


def group_key(study_uid: str, recipients: Sequence[str]) -> str:
    """The key of a study going to some recipients (one package per key and batch)."""
    return _hash(study_uid, *sorted(recipients))


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fp:
        os.fsync(fp.fileno())


def _wait(flushed: list[Future[None]], *, quiet: bool = False) -> None:
    """Wait for every flush; the first failure is raised unless ``quiet``."""
    errors = [f.exception() for f in flushed]
    failed = next((e for e in errors if e is not None), None)
    if failed is not None and not quiet:
        raise failed


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class StoredInstance:
    """One instance kept in the spool."""

    group_key: str
    path: Path
    size: int


@dataclass
class Arrival:
    """A received file moved into the spool, not yet durable nor journaled."""

    path: Path
    size: int


@dataclass
class Batch:
    """Instances of one study taken together into one package."""

    id: int
    group_key: str
    recipients: list[str]
    state: str
    package_id: str | None
    files: list[Path]
    attempts: int


class Spool:
    """The spool folder and its journal (one per listener, in the gateway's state)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files = folder / "instances"
        self.files.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.journal = JournalConnections(folder / "journal.db", SCHEMA)
        self._lock = threading.Lock()
        #: flushes a file and the spool folder while the journal commits
        self._flusher = ThreadPoolExecutor(max_workers=4, thread_name_prefix="spool-fsync")

    def db(self) -> sqlite3.Connection:
        return self.journal.get()

    # ------------------------------------------------------------------ receiving
    def receive(self, received: Path) -> Arrival:
        """Move a received file into the spool (not yet durable: a crash before
        :meth:`keep` leaves a stray that :meth:`remove_strays` removes).

        The listener checks the instance there, then keeps or discards it.

        :param received: the file as written by the network layer; moved (or copied
            when on another file system), never rewritten.
        :raises OSError: the disk refused (full, read-only): do not acknowledge.
        """
        name = f"{secrets.token_hex(16)}.dcm"
        target = self.files / name
        try:
            os.replace(received, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            shutil.copyfile(received, target)
        return Arrival(target, target.stat().st_size)

    def discard(self, arrival: Arrival) -> None:
        """A received file refused by the listener: removed, never journaled."""
        arrival.path.unlink(missing_ok=True)

    def keep(
        self,
        received: Path | Arrival,
        study_uid: str,
        sop_uid: str,
        recipients: Sequence[str],
    ) -> StoredInstance:
        """Journal a received file; return once its bytes, name and row are durable.

        :param received: what :meth:`receive` returned, or the file as written by the
            network layer (then received first).
        :raises OSError: the disk refused (full, read-only): do not acknowledge.
        """
        arrival = received if isinstance(received, Arrival) else self.receive(received)
        target, size, name = arrival.path, arrival.size, arrival.path.name
        # the file and its name are flushed while the journal commits (one flush of the
        # file system for all three when they overlap)
        flushed = [
            self._flusher.submit(_fsync_file, target),
            self._flusher.submit(fsync_dir, self.files),
        ]
        key = group_key(study_uid, recipients)
        sop_key = _hash(sop_uid)
        now = time.time()
        db = self.db()
        replaced: list[str] = []
        with self._lock:
            db.execute("BEGIN IMMEDIATE")
            try:
                # the same instance sent again before its study left: keep the newest
                replaced = [
                    r["file"]
                    for r in db.execute(
                        "SELECT file FROM instances WHERE group_key = ? AND sop_key = ? "
                        "AND batch IS NULL",
                        (key, sop_key),
                    )
                ]
                if replaced:  # the older copy goes only once the newer one is durable
                    _wait(flushed)
                db.execute(
                    "DELETE FROM instances WHERE group_key = ? AND sop_key = ? AND batch IS NULL",
                    (key, sop_key),
                )
                db.execute(
                    "INSERT INTO instances (group_key, sop_key, file, size, arrived) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (key, sop_key, name, size, now),
                )
                db.execute(
                    "INSERT INTO groups (key, recipients, last_arrival) VALUES (?, ?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET last_arrival = excluded.last_arrival",
                    (key, json.dumps(sorted(recipients)), now),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                _wait(flushed, quiet=True)
                target.unlink(missing_ok=True)
                raise
        try:
            _wait(flushed)
        except OSError:
            self._forget(name)
            target.unlink(missing_ok=True)
            raise
        for old in replaced:
            (self.files / old).unlink(missing_ok=True)
        return StoredInstance(key, target, size)

    def _forget(self, name: str) -> None:
        """Drop the row of a file that could not be made durable (never acknowledged)."""
        with self._lock:
            self.db().execute("DELETE FROM instances WHERE file = ? AND batch IS NULL", (name,))

    def remove_strays(self) -> int:
        """At start: remove spool files without a journal row (never acknowledged), and
        give waiting studies a full settle time again (the modality may resume)."""
        db = self.db()
        db.execute("UPDATE groups SET last_arrival = ?", (time.time(),))
        # a waiting row whose file did not survive whole was never acknowledged
        for row in db.execute(
            "SELECT id, file, size FROM instances WHERE batch IS NULL"
        ).fetchall():
            path = self.files / row["file"]
            if not path.is_file() or path.stat().st_size != row["size"]:
                db.execute("DELETE FROM instances WHERE id = ?", (row["id"],))
        known = {r["file"] for r in db.execute("SELECT file FROM instances")}
        removed = 0
        for path in self.files.iterdir():
            if path.name not in known:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    # ------------------------------------------------------------------ sending
    def due_groups(self, settle_seconds: float, busy: set[str], now: float) -> list[str]:
        """Groups with waiting instances, quiet for ``settle_seconds`` and not in ``busy``
        (studies an open association is still adding to, when sending at its end)."""
        rows = self.db().execute(
            "SELECT DISTINCT g.key, g.last_arrival FROM groups g "
            "JOIN instances i ON i.group_key = g.key AND i.batch IS NULL"
        )
        return [
            r["key"]
            for r in rows
            if r["key"] not in busy and now - r["last_arrival"] >= settle_seconds
        ]

    def open_batch(self, key: str) -> Batch | None:
        """Take every waiting instance of a group into a new batch."""
        db = self.db()
        with self._lock:
            db.execute("BEGIN IMMEDIATE")
            try:
                group = db.execute("SELECT * FROM groups WHERE key = ?", (key,)).fetchone()
                waiting = db.execute(
                    "SELECT COUNT(*) AS n, COALESCE(SUM(size), 0) AS bytes FROM instances "
                    "WHERE group_key = ? AND batch IS NULL",
                    (key,),
                ).fetchone()
                if group is None or not waiting["n"]:
                    db.execute("COMMIT")
                    return None
                batch_id = db.execute(
                    "INSERT INTO batches (group_key, recipients, state, instances, bytes) "
                    "VALUES (?, ?, 'sending', ?, ?)",
                    (key, group["recipients"], waiting["n"], waiting["bytes"]),
                ).lastrowid
                db.execute(
                    "UPDATE instances SET batch = ? WHERE group_key = ? AND batch IS NULL",
                    (batch_id, key),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        assert batch_id is not None
        return self.batch(batch_id)

    def batch(self, batch_id: int) -> Batch:
        db = self.db()
        row = db.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
        files = [
            self.files / r["file"]
            for r in db.execute(
                "SELECT file FROM instances WHERE batch = ? ORDER BY id", (batch_id,)
            )
        ]
        return Batch(
            row["id"],
            row["group_key"],
            json.loads(row["recipients"]),
            row["state"],
            row["package_id"],
            files,
            row["attempts"],
        )

    def unfinished(self, now: float | None = None) -> list[Batch]:
        """Batches not yet sent (due for another try at ``now``, when given)."""
        query = "SELECT id FROM batches WHERE state != 'sent'"
        args: tuple[Any, ...] = ()
        if now is not None:
            query += " AND next_attempt <= ?"
            args = (now,)
        return [self.batch(r["id"]) for r in self.db().execute(query + " ORDER BY id", args)]

    def note_package(self, batch_id: int, package_id: str) -> None:
        self.db().execute(
            "UPDATE batches SET package_id = ?, state = 'sending' WHERE id = ?",
            (package_id, batch_id),
        )

    def note_sealing(self, batch_id: int, package_id: str) -> None:
        self.db().execute(
            "UPDATE batches SET package_id = ?, state = 'sealing' WHERE id = ?",
            (package_id, batch_id),
        )

    def restart(self, batch_id: int) -> None:
        """The hub never sealed the batch's package: send it again in a new one."""
        self.db().execute(
            "UPDATE batches SET package_id = NULL, state = 'sending' WHERE id = ?", (batch_id,)
        )

    def failed(self, batch_id: int, reason: str, retry_at: float) -> None:
        self.db().execute(
            "UPDATE batches SET attempts = attempts + 1, next_attempt = ?, error = ? WHERE id = ?",
            (retry_at, reason, batch_id),
        )

    def sent(self, batch_id: int, package_id: str) -> None:
        """The hub sealed the package: journal it, then remove the files."""
        db = self.db()
        files = [
            r["file"] for r in db.execute("SELECT file FROM instances WHERE batch = ?", (batch_id,))
        ]
        with self._lock:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "UPDATE batches SET state = 'sent', package_id = ?, error = NULL, "
                    "finished = ? WHERE id = ?",
                    (package_id, time.time(), batch_id),
                )
                db.execute("DELETE FROM instances WHERE batch = ?", (batch_id,))
                db.execute(
                    "DELETE FROM groups WHERE NOT EXISTS "
                    "(SELECT 1 FROM instances i WHERE i.group_key = groups.key)"
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        for name in files:
            (self.files / name).unlink(missing_ok=True)

    def requeue(self, batch_id: int, paths: Sequence[Path]) -> None:
        """Put files the hub did not take back to waiting (they go in a later package)."""
        self.db().executemany(
            "UPDATE instances SET batch = NULL WHERE batch = ? AND file = ?",
            [(batch_id, p.name) for p in paths],
        )

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        db = self.db()
        waiting = db.execute(
            "SELECT COUNT(*) AS n, COUNT(DISTINCT group_key) AS g FROM instances "
            "WHERE batch IS NULL"
        ).fetchone()
        batches = {
            r["state"]: r["n"]
            for r in db.execute("SELECT state, COUNT(*) AS n FROM batches GROUP BY state")
        }
        errors = [
            r["error"]
            for r in db.execute(
                "SELECT error FROM batches WHERE state != 'sent' AND error IS NOT NULL"
            )
        ]
        packages = [
            r["package_id"]
            for r in db.execute(
                "SELECT package_id FROM batches WHERE state = 'sent' ORDER BY id DESC LIMIT 20"
            )
        ]
        return {
            "waiting_instances": waiting["n"],
            "waiting_studies": waiting["g"],
            "batches": batches,
            "errors": errors,
            "recent_packages": packages,
        }
