"""Gateway source and destination of kind ``dicomweb``.

*Source*: polls the PACS with a QIDO-RS query and auto-routes every matching study to
its recipients once the study has settled (no new instance for ``settle_seconds``):
the emergency-department case, where images must arrive before the patient.
Instances that reach the PACS after a study was sent follow in another package.

*Destination*: stores every package arriving for the facility into its PACS with
STOW-RS. A PACS that is down or busy raises, so the gateway retries with backoff;
instances the PACS refuses for good are reported and kept in ``failed/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from dataclasses import replace
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emix_core import ConfigError, EmixError, Package
from emix_dicomweb.connection import PacsConnection, PacsSettings, PacsUnavailable
from emix_dicomweb.query import StudyMatch, list_instances
from emix_dicomweb.retrieve import Retrieval
from emix_dicomweb.store import StoreSettings
from emix_dicomweb.transfer import (
    keep_failed,
    query_studies,
    retrieve_studies,
    store_package_folder,
    work_folder,
)

if TYPE_CHECKING:
    from emix_core import Gateway

__all__ = ["DicomwebDestination", "DicomwebSource", "SOURCE_SETTINGS", "DESTINATION_SETTINGS"]

log = logging.getLogger("emix.dicomweb")

PACS_SETTINGS = {
    "url": "DICOMweb base URL of the PACS (http:// or https://)",
    "auth": "none, basic, bearer or cert (default: inferred from the settings given)",
    "username": "user for basic authentication",
    "password": "password for basic authentication (prefer password_file or password_env)",
    "password_file": "file holding the password",
    "password_env": "environment variable holding the password",
    "token": "bearer token (prefer token_file or token_env)",
    "token_file": "file holding the bearer token",
    "token_env": "environment variable holding the bearer token",
    "cert": "client certificate (PEM) for cert authentication",
    "key": "private key of the client certificate (PEM), if not in cert",
    "tls_verify": "verify the PACS's certificate: true (default), false or a CA bundle path",
    "timeout": "seconds to wait for the PACS to answer (default 60)",
}
#: Every setting of a ``[[sources]]`` table of kind ``dicomweb``.
SOURCE_SETTINGS = {
    **PACS_SETTINGS,
    "kind": '"dicomweb"',
    "name": "name shown in logs and status",
    "to": "recipient address, or a list of them",
    "query": 'QIDO-RS matching keys, e.g. { ModalitiesInStudy = "CT" }',
    "days": "only studies whose StudyDate is within the last N days (default 1; 0: any date)",
    "poll_seconds": "how often the PACS is queried (default 30)",
    "settle_seconds": "send a study once no instance arrived for this long (default 60)",
    "expires_days": "days the packages stay available on the hub",
    "parallel": "parallel WADO-RS retrievals (default 2)",
}
#: Every setting of a ``[[destinations]]`` table of kind ``dicomweb``.
DESTINATION_SETTINGS = {
    **PACS_SETTINGS,
    "kind": '"dicomweb"',
    "name": "name shown in logs and status",
    "batch_mb": "largest STOW-RS request, MB (default 32)",
    "batch_count": "most instances per STOW-RS request (default 100)",
    "parallel": "STOW-RS requests in flight at once (default 2)",
    "attempts": "tries of a batch before the delivery is retried later (default 4)",
    "retry_seconds": "first wait between tries, doubling (default 1)",
    "skip_existing": "do not send instances the PACS already has (default true)",
    "verify": "check with QIDO-RS that stored instances are listed (default true)",
    "progressive": "store each verified batch of a package while its sender still uploads "
    "(default true; the gateway's [gateway] progressive must be on too)",
}

JOURNAL_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    key TEXT PRIMARY KEY,           -- SHA-256 of the study UID: no UID at rest here
    state TEXT NOT NULL,            -- settling, sent, failed
    instances INTEGER,              -- count the PACS reported when last seen
    changed REAL NOT NULL,          -- when that count last changed
    sent_instances INTEGER NOT NULL DEFAULT 0,
    package_id TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    error TEXT
);
CREATE TABLE IF NOT EXISTS sent (
    study_key TEXT NOT NULL,
    instance_key TEXT NOT NULL,
    PRIMARY KEY (study_key, instance_key)
);
CREATE TABLE IF NOT EXISTS pending_packages (
    package_id TEXT PRIMARY KEY,
    study_key TEXT NOT NULL
);
"""


def _key(uid: str) -> str:
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()


def _check_settings(settings: dict[str, Any], known: dict[str, str], what: str) -> None:
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r} in a dicomweb {what}")


class DicomwebSource:
    """Auto-route studies matching a QIDO-RS query from a PACS to recipients."""

    def __init__(self, settings: dict[str, Any], gateway: Gateway) -> None:
        _check_settings(settings, SOURCE_SETTINGS, "source")
        self.name = str(settings["name"])
        self.gateway = gateway
        self.conn = PacsConnection(PacsSettings.from_table(settings, gateway.base_dir))
        to = settings.get("to")
        self.to = [to] if isinstance(to, str) else list(to or [])
        if not self.to or not all(isinstance(t, str) and t for t in self.to):
            raise ConfigError(f'dicomweb source {self.name!r} needs to = "recipient"')
        query = settings.get("query", {})
        if not isinstance(query, dict):
            raise ConfigError(f"dicomweb source {self.name!r}: query must be a table")
        self.query = {str(k): str(v) for k, v in query.items()}
        self.days = int(settings.get("days", 1))
        self.poll_seconds = float(settings.get("poll_seconds", 30))
        self.settle_seconds = float(settings.get("settle_seconds", 60))
        self.expires_days = settings.get("expires_days")
        self.parallel = int(settings.get("parallel", 2))
        self.journal_path = gateway.state_dir / f"dicomweb-source-{_key(self.name)[:12]}.db"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error = ""
        self.last_poll: float | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"dicomweb:{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    def _db(self):  # type: ignore[no-untyped-def]
        from emix_core import open_journal

        db = open_journal(self.journal_path)
        db.executescript(JOURNAL_SCHEMA)
        return db

    def _run(self) -> None:
        db = self._db()
        try:
            self._resolve_pending(db)
            while not self._stop.is_set():
                try:
                    self.poll(db)
                    self.last_error = ""
                except EmixError as exc:
                    self.last_error = exc.message
                    log.warning(
                        "dicomweb.source.poll_failed",
                        extra={"emix": {"source": self.name, "reason": exc.message}},
                    )
                except Exception:  # keep polling whatever one round did
                    log.exception("dicomweb.source.crashed", extra={"emix": {"source": self.name}})
                self._stop.wait(self.poll_seconds)
        finally:
            db.close()

    # ------------------------------------------------------------------ polling
    def _filters(self) -> dict[str, str]:
        filters = dict(self.query)
        if self.days > 0 and "StudyDate" not in filters:
            since = date.today() - timedelta(days=self.days)
            filters["StudyDate"] = f"{since:%Y%m%d}-"
        return filters

    def poll(self, db: Any) -> None:
        """One round: query, note changes, send the studies that have settled."""
        now = time.time()
        self.last_poll = now
        matches = query_studies(
            self.conn, self._filters(), home=self.gateway.home, actor=f"gateway:{self.name}"
        )
        for match in matches:
            key = _key(match.study_uid)
            row = db.execute("SELECT * FROM studies WHERE key = ?", (key,)).fetchone()
            count = match.instances
            if row is None:
                db.execute(
                    "INSERT INTO studies (key, state, instances, changed) "
                    "VALUES (?, 'settling', ?, ?)",
                    (key, count, now),
                )
                continue
            if count is not None and count != row["instances"]:
                # instances still arriving: wait until the study settles; a study already
                # sent that got more instances is due again, for the new ones only
                reopen = row["state"] == "sent" and count > row["sent_instances"]
                db.execute(
                    "UPDATE studies SET instances = ?, changed = ?, state = ? WHERE key = ?",
                    (count, now, "settling" if reopen else row["state"], key),
                )
                continue
            due = row["state"] == "settling" or (
                row["state"] == "failed" and row["next_attempt"] <= now
            )
            if due and now - row["changed"] >= self.settle_seconds:
                self._send_study(db, match, key)

    def _send_study(self, db: Any, match: StudyMatch, key: str) -> None:
        sent = {
            r["instance_key"]
            for r in db.execute("SELECT instance_key FROM sent WHERE study_key = ?", (key,))
        }
        listed = list_instances(self.conn, match.study_uid)
        new = [(series, sop) for series, sop in listed if _key(sop) not in sent]
        if not new:
            db.execute(
                "UPDATE studies SET state = 'sent', sent_instances = ? WHERE key = ?",
                (len(listed), key),
            )
            return
        by_series: dict[str, list[str]] = {}
        for series, sop in new:
            by_series.setdefault(series, []).append(sop)
        retrievals = []
        for series, sops in by_series.items():
            if len(sops) == sum(1 for s, _ in listed if s == series):  # the whole series
                retrievals.append(Retrieval(match.study_uid, series))
            else:
                retrievals += [Retrieval(match.study_uid, series, sop) for sop in sops]
        home = self.gateway.home
        try:
            with work_folder(home, "dicomweb-route") as folder:
                retrieve_studies(
                    self.conn,
                    [match],
                    folder,
                    home=home,
                    actor=f"gateway:{self.name}",
                    parallel=self.parallel,
                    retrievals=retrievals,
                )

                def journal(package_id: str) -> None:
                    db.execute(
                        "INSERT OR REPLACE INTO pending_packages VALUES (?, ?)", (package_id, key)
                    )

                kw: dict[str, Any] = {"on_package_created": journal}
                if self.expires_days:
                    kw["expires_days"] = int(self.expires_days)
                result = self.gateway.send([folder], self.to, **kw)
        except EmixError as exc:
            self._failed(db, key, exc.message)
            return
        if not result.package_id:
            reason = result.failed[0].error if result.failed else "nothing could be sent"
            self._failed(db, key, reason)
            return
        self._mark_sent(db, key, [sop for _, sop in new], result.package_id, len(listed))
        log.info(
            "dicomweb.source.routed",
            extra={
                "emix": {
                    "source": self.name,
                    "package": result.package_id,
                    "instances": result.items,
                }
            },
        )

    def _mark_sent(
        self, db: Any, key: str, sops: list[str], package_id: str, instances: int
    ) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT OR IGNORE INTO sent VALUES (?, ?)", [(key, _key(s)) for s in sops]
            )
            db.execute(
                "UPDATE studies SET state = 'sent', sent_instances = ?, package_id = ?, "
                "attempts = 0, error = NULL WHERE key = ?",
                (instances, package_id, key),
            )
            db.execute("DELETE FROM pending_packages WHERE package_id = ?", (package_id,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _failed(self, db: Any, key: str, reason: str) -> None:
        from emix_core import retry_delay

        row = db.execute("SELECT attempts FROM studies WHERE key = ?", (key,)).fetchone()
        attempts = (row["attempts"] if row else 0) + 1
        delay = retry_delay(attempts, self.gateway.retry_max_seconds)
        db.execute(
            "UPDATE studies SET state = 'failed', attempts = ?, next_attempt = ?, error = ? "
            "WHERE key = ?",
            (attempts, time.time() + delay, reason, key),
        )
        log.warning(
            "dicomweb.source.send_failed",
            extra={
                "emix": {"source": self.name, "reason": reason, "retry_seconds": round(delay, 1)}
            },
        )

    def _resolve_pending(self, db: Any) -> None:
        """After a crash mid-send: a package the hub sealed counts as sent."""
        for row in db.execute("SELECT * FROM pending_packages").fetchall():
            try:
                state = self.gateway.client.status(row["package_id"]).get("state")
            except EmixError:
                continue
            if state == "sealed":
                db.execute(
                    "UPDATE studies SET state = 'sent', package_id = ? WHERE key = ?",
                    (row["package_id"], row["study_key"]),
                )
            else:  # abandoned: abort it, so that a receiving gateway stops waiting for it
                with contextlib.suppress(EmixError):
                    self.gateway.client.abort_package(row["package_id"])
            db.execute("DELETE FROM pending_packages WHERE package_id = ?", (row["package_id"],))

    def queue_depths(self) -> dict[str, int]:
        """Studies waiting to settle or to be tried again (``pending``), in a package being
        sent (``in_flight``), and among the pending those whose last try failed."""
        depths = {"pending": 0, "in_flight": 0, "failed": 0, "retrying": 0}
        if not self.journal_path.exists():
            return depths
        db = self._db()
        try:
            counts = dict(db.execute("SELECT state, COUNT(*) FROM studies GROUP BY state"))
            in_flight = db.execute("SELECT COUNT(*) FROM pending_packages").fetchone()[0]
        finally:
            db.close()
        depths["retrying"] = counts.get("failed", 0)  # tried again after a delay
        depths["pending"] = counts.get("settling", 0) + depths["retrying"]
        depths["in_flight"] = in_flight
        return depths

    def status(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        if self.journal_path.exists():
            db = self._db()
            try:
                counts = {
                    r["state"]: r["n"]
                    for r in db.execute("SELECT state, COUNT(*) AS n FROM studies GROUP BY state")
                }
                errors = [
                    r["error"]
                    for r in db.execute("SELECT error FROM studies WHERE state = 'failed'")
                ]
            finally:
                db.close()
        else:
            errors = []
        return {
            "kind": "dicomweb",
            "pacs": self.conn.host,
            "studies": counts,
            "errors": errors,
            "last_error": self.last_error,
            "last_poll": self.last_poll,
        }


class DicomwebDestination:
    """Store every arriving package into the facility's PACS with STOW-RS."""

    def __init__(self, settings: dict[str, Any], gateway: Gateway) -> None:
        _check_settings(settings, DESTINATION_SETTINGS, "destination")
        self.name = str(settings["name"])
        self.gateway = gateway
        self.conn = PacsConnection(PacsSettings.from_table(settings, gateway.base_dir))
        self.store_settings = StoreSettings.from_table(settings)
        self.progressive = settings.get("progressive", True)
        if not isinstance(self.progressive, bool):
            raise ConfigError(f"dicomweb destination {self.name!r}: progressive must be true/false")

    def deliver_verified(self, package: Package, path: Path) -> None:
        """STOW verified instances of a package not sealed yet (``package.items``: those).

        No listing before and no check after: the delivery of the whole package, once
        sealed, skips what the PACS lists and checks the rest.
        """
        settings = replace(self.store_settings, skip_existing=False, verify=False)
        store_package_folder(
            package,
            path,
            self.conn,
            home=self.gateway.home,
            actor=f"gateway:{self.name}",
            settings=settings,
        )

    def deliver(self, package: Package, path: Path) -> dict[str, Any]:
        """STOW the package's instances; raise :class:`PacsUnavailable` to be retried.

        Instances the PACS refuses for good do not make the delivery fail again and
        again: they are reported, audited and kept in the home's ``failed/`` folder.
        """
        report, documents = store_package_folder(
            package,
            path,
            self.conn,
            home=self.gateway.home,
            actor=f"gateway:{self.name}",
            settings=self.store_settings,
        )
        if report.transient_failures:
            raise PacsUnavailable(
                f"the PACS at {self.conn.host} is short of resources for "
                f"{len(report.transient_failures)} instances; will try again"
            )
        kept = keep_failed(self.gateway.home, package.id, report)
        out = {"pacs": self.conn.host, **report.to_dict(with_uids=False)}
        out["documents_not_stored"] = documents
        if kept is not None:
            out["failed_folder"] = str(kept)
            log.warning(
                "dicomweb.destination.refused",
                extra={
                    "emix": {
                        "destination": self.name,
                        "package": package.id,
                        "instances": report.count("failed"),
                    }
                },
            )
        return out
