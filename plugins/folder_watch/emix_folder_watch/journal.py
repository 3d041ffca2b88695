"""The drop folder's journal: each file's state, in SQLite, fsync'd on every commit.

A file row goes ``pending`` (complete, classified) → ``batched`` (in a package being
sent) → ``moving`` (the outcome is decided: sent, duplicate, ignored or failed) →
``finished`` (moved to ``sent/`` or ``failed/``, or deleted). A batch row records the
package id as soon as the hub assigns it, so that after ``kill -9`` the gateway asks
the hub whether that package was sealed instead of sending the files twice.

The journal holds no PHI: studies, accession numbers and SOP instances are stored as
salted hashes only.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emix_core import JournalConnections, time_now

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,             -- relative POSIX path in the drop folder
    recipients TEXT NOT NULL,       -- comma-separated facility addresses
    dev INTEGER, ino INTEGER, size INTEGER, mtime_ns INTEGER,
    kind TEXT NOT NULL,             -- dicom, document, sidecar, ignored, refused
    study TEXT, accession TEXT, identity TEXT, document TEXT,
    state TEXT NOT NULL,            -- pending, batched, moving, finished
    outcome TEXT,                   -- sent, duplicate, ignored, failed
    batch INTEGER, package TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT, target TEXT,
    arrived REAL NOT NULL, finished REAL
);
CREATE INDEX IF NOT EXISTS files_state ON files (state);
CREATE INDEX IF NOT EXISTS files_identity ON files (identity);
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY,
    recipients TEXT NOT NULL,
    state TEXT NOT NULL,            -- sending, done
    package TEXT,
    sealing INTEGER NOT NULL DEFAULT 0, -- the seal request may have reached the hub
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    error TEXT,
    created REAL NOT NULL, finished REAL,
    items INTEGER, bytes INTEGER, seconds REAL
);
"""

ACTIVE = ("pending", "batched", "moving")


def digest(kind: str, value: str | None) -> str | None:
    """A stable, non-reversible key for a UID, an accession number or a content hash."""
    if not value:
        return None
    return hashlib.sha256(f"emix-folder-watch:{kind}:{value}".encode()).hexdigest()[:40]


@dataclass
class FileRow:
    """One journaled file (a subset of the columns)."""

    id: int
    path: str
    recipients: str
    kind: str
    study: str | None
    accession: str | None
    identity: str | None
    document: str | None
    state: str
    arrived: float
    ino: int | None
    size: int | None
    mtime_ns: int | None

    @classmethod
    def of(cls, row: sqlite3.Row) -> FileRow:
        return cls(**{k: row[k] for k in cls.__dataclass_fields__})


class OutboxJournal:
    """Journal of one drop folder (one SQLite file in the gateway's state folder)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._journal = JournalConnections(self.path, SCHEMA)

    @property
    def db(self) -> sqlite3.Connection:
        return self._journal.get()

    def transaction(self) -> _Transaction:
        return _Transaction(self.db)

    # ------------------------------------------------------------------ files
    def active_paths(self) -> set[str]:
        return {
            r["path"]
            for r in self.db.execute(
                "SELECT path FROM files WHERE state IN ('pending', 'batched', 'moving')"
            )
        }

    def add_file(self, **values: Any) -> int:
        values.setdefault("arrived", time_now())
        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        cursor = self.db.execute(
            f"INSERT INTO files ({columns}) VALUES ({marks})", tuple(values.values())
        )
        return int(cursor.lastrowid or 0)

    def is_known(self, recipients: str, identity: str | None) -> bool:
        """True when a file with this identity is queued or was sent to these recipients."""
        if identity is None:
            return False
        row = self.db.execute(
            "SELECT 1 FROM files WHERE identity = ? AND recipients = ? AND "
            "(state IN ('pending', 'batched') OR outcome = 'sent') LIMIT 1",
            (identity, recipients),
        ).fetchone()
        return row is not None

    def pending(self) -> list[FileRow]:
        return [
            FileRow.of(r)
            for r in self.db.execute("SELECT * FROM files WHERE state = 'pending' ORDER BY id")
        ]

    def forget(self, file_ids: Iterable[int]) -> None:
        """Drop rows of files that changed after they were classified (seen again later)."""
        with self.transaction():
            self.db.executemany("DELETE FROM files WHERE id = ?", [(i,) for i in file_ids])

    def restart_quiet_windows(self) -> None:
        """After a restart, pending studies wait a full settle time again: files of them
        may still be arriving."""
        self.db.execute("UPDATE files SET arrived = ? WHERE state = 'pending'", (time_now(),))

    def decide(self, file_ids: Sequence[int], outcome: str, error: str | None = None) -> None:
        with self.transaction():
            self.db.executemany(
                "UPDATE files SET state = 'moving', outcome = ?, error = ? WHERE id = ?",
                [(outcome, error, i) for i in file_ids],
            )

    def moving(self) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM files WHERE state = 'moving' ORDER BY id").fetchall()

    def set_targets(self, targets: dict[int, str]) -> None:
        with self.transaction():
            self.db.executemany(
                "UPDATE files SET target = ? WHERE id = ?", [(t, i) for i, t in targets.items()]
            )

    def finish(self, file_ids: Sequence[int]) -> None:
        now = time_now()
        with self.transaction():
            self.db.executemany(
                "UPDATE files SET state = 'finished', finished = ? WHERE id = ?",
                [(now, i) for i in file_ids],
            )

    def prune(self, keep_days: float) -> None:
        """Forget finished files and batches older than ``keep_days`` (the window in which
        a file dropped again is recognised as a duplicate)."""
        cutoff = time_now() - keep_days * 86400
        with self.transaction():
            self.db.execute(
                "DELETE FROM files WHERE state = 'finished' AND finished < ?", (cutoff,)
            )
            self.db.execute("DELETE FROM batches WHERE state = 'done' AND finished < ?", (cutoff,))

    # ------------------------------------------------------------------ batches
    def create_batch(self, recipients: str, file_ids: Sequence[int]) -> int:
        with self.transaction():
            cursor = self.db.execute(
                "INSERT INTO batches (recipients, state, created) VALUES (?, 'sending', ?)",
                (recipients, time_now()),
            )
            batch = int(cursor.lastrowid or 0)
            self.db.executemany(
                "UPDATE files SET state = 'batched', batch = ? WHERE id = ? AND state = 'pending'",
                [(batch, i) for i in file_ids],
            )
        return batch

    def sending_batches(self) -> list[sqlite3.Row]:
        return self.db.execute(
            "SELECT * FROM batches WHERE state = 'sending' ORDER BY id"
        ).fetchall()

    def batch_files(self, batch: int) -> list[FileRow]:
        return [
            FileRow.of(r)
            for r in self.db.execute(
                "SELECT * FROM files WHERE batch = ? AND state = 'batched' ORDER BY id", (batch,)
            )
        ]

    def set_package(self, batch: int, package_id: str | None) -> None:
        self.db.execute(
            "UPDATE batches SET package = ?, sealing = 0 WHERE id = ?", (package_id, batch)
        )

    def set_sealing(self, batch: int) -> None:
        self.db.execute("UPDATE batches SET sealing = 1 WHERE id = ?", (batch,))

    def postpone(self, batch: int, attempts: int, next_attempt: float, error: str) -> None:
        self.db.execute(
            "UPDATE batches SET attempts = ?, next_attempt = ?, error = ? WHERE id = ?",
            (attempts, next_attempt, error, batch),
        )

    def close_batch(
        self,
        batch: int,
        *,
        package_id: str | None,
        sent: Sequence[int] = (),
        duplicates: Sequence[int] = (),
        retry: dict[int, str] | None = None,
        failed: dict[int, str] | None = None,
        stats: tuple[int, int, float] = (0, 0, 0.0),
    ) -> None:
        """Record a batch's result in one transaction."""
        with self.transaction():
            self.db.executemany(
                "UPDATE files SET state = 'moving', outcome = 'sent', package = ? WHERE id = ?",
                [(package_id, i) for i in sent],
            )
            self.db.executemany(
                "UPDATE files SET state = 'moving', outcome = 'duplicate' WHERE id = ?",
                [(i,) for i in duplicates],
            )
            self.db.executemany(
                "UPDATE files SET state = 'pending', batch = NULL, attempts = attempts + 1, "
                "error = ? WHERE id = ?",
                [(e, i) for i, e in (retry or {}).items()],
            )
            self.db.executemany(
                "UPDATE files SET state = 'moving', outcome = 'failed', error = ? WHERE id = ?",
                [(e, i) for i, e in (failed or {}).items()],
            )
            self.db.execute(
                "UPDATE batches SET state = 'done', package = ?, finished = ?, items = ?, "
                "bytes = ?, seconds = ?, error = NULL WHERE id = ?",
                (package_id, time_now(), *stats, batch),
            )

    def attempts_of(self, file_ids: Sequence[int]) -> dict[int, int]:
        marks = ", ".join("?" for _ in file_ids)
        return {
            r["id"]: r["attempts"]
            for r in self.db.execute(
                f"SELECT id, attempts FROM files WHERE id IN ({marks})", tuple(file_ids)
            )
        }

    # ------------------------------------------------------------------ status
    def queue_depths(self) -> dict[str, int]:
        """Files waiting, in a package being sent, kept in ``failed/``, and retried."""
        db = self.db
        row = db.execute(
            "SELECT SUM(state = 'pending') AS pending, "
            "SUM(state IN ('batched', 'moving')) AS in_flight, "
            "SUM(state = 'finished' AND outcome = 'failed') AS failed FROM files"
        ).fetchone()
        retrying = db.execute(
            "SELECT COUNT(*) FROM files f JOIN batches b ON b.id = f.batch "
            "WHERE f.state = 'batched' AND b.state = 'sending' AND b.attempts > 0"
        ).fetchone()[0]
        return {
            "pending": row["pending"] or 0,
            "in_flight": row["in_flight"] or 0,
            "failed": row["failed"] or 0,
            "retrying": retrying,
        }

    def summary(self) -> dict[str, Any]:
        """Counts for ``emix gateway status``."""
        db = self.db
        files = {
            f"{r['state']}/{r['outcome'] or '-'}": r["n"]
            for r in db.execute(
                "SELECT state, outcome, COUNT(*) AS n FROM files GROUP BY state, outcome"
            )
        }

        def count(state: str | None = None, outcome: str | None = None) -> int:
            return sum(
                n
                for key, n in files.items()
                if (state is None or key.split("/")[0] == state)
                and (outcome is None or key.split("/")[1] == outcome)
            )

        retrying = [
            {
                "recipients": r["recipients"],
                "attempts": r["attempts"],
                "error": r["error"],
                "files": db.execute(
                    "SELECT COUNT(*) FROM files WHERE batch = ? AND state = 'batched'", (r["id"],)
                ).fetchone()[0],
            }
            for r in db.execute("SELECT * FROM batches WHERE state = 'sending' AND attempts > 0")
        ]
        last = db.execute(
            "SELECT * FROM batches WHERE state = 'done' AND package IS NOT NULL "
            "ORDER BY finished DESC LIMIT 1"
        ).fetchone()
        failed = [
            {"file": r["target"], "error": r["error"]}
            for r in db.execute(
                "SELECT target, error FROM files WHERE outcome = 'failed' AND state = 'finished' "
                "ORDER BY finished DESC LIMIT 20"
            )
        ]
        return {
            "pending": count("pending") + count("batched"),
            "sending": count("batched"),
            "sent": count(outcome="sent"),
            "duplicates": count(outcome="duplicate"),
            "failed": count(outcome="failed"),
            "packages": db.execute(
                "SELECT COUNT(*) FROM batches WHERE state = 'done' AND package IS NOT NULL"
            ).fetchone()[0],
            "retrying": retrying,
            "last_package": (
                {
                    "package": last["package"],
                    "to": last["recipients"],
                    "items": last["items"],
                    "bytes": last["bytes"],
                    "seconds": last["seconds"],
                }
                if last
                else None
            ),
            "recent_failures": failed,
        }


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
