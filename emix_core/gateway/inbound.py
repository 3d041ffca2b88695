"""Inbound side of the gateway: collect arrived packages and deliver each exactly once.

For every package the inbox lists that this gateway has not handled yet, the journal
first records it, then the package is received into the spool (signature and hashes
verified, signed receipt posted), then handed to every destination. Each step is
journaled (SQLite, fsync'd) before the next one starts, so ``kill -9`` at any moment and
a restart redo at most the unfinished step; destinations are idempotent (the folder
destination never overwrites), so nothing is delivered twice.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from emix_core.client.progressive import Progress, ProgressiveReception, staging_folder
from emix_core.client.receiver import MANIFEST_NAME, receive_package
from emix_core.errors import (
    AuthenticationError,
    ConfigError,
    EmixError,
    HubUnavailable,
    NotFoundError,
    PackageNotSealed,
)
from emix_core.gateway.runner import JournalConnections, log_event, retry_delay, time_now
from emix_core.model import (
    AuditAction,
    AuditEvent,
    AuditOutcome,
    Item,
    Package,
    Recipient,
    is_valid_address,
)

if TYPE_CHECKING:
    from emix_core.gateway.runner import Destination, Gateway, ProgressiveDestination

log = logging.getLogger("emix.gateway.inbound")

#: Package ids the hub assigns; anything else is refused before it touches a path.
PACKAGE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
#: A package failing to be received this many times is given up (see ``status``).
MAX_RECEIVE_ATTEMPTS = 10
#: The whole inbox is listed at least this often, even when its fingerprint is unchanged.
FULL_LIST_SECONDS = 300.0
#: Finished packages are forgotten after this long. Should one still be listed by the
#: hub, it shows as received already and is skipped, never delivered twice.
FORGET_AFTER_DAYS = 90
#: A progressive package whose sender pauses is looked at again after this long, or as
#: soon as the inbox shows it grew.
NOT_SEALED_RETRY_SECONDS = 60.0
#: The journal's note on a progressive package waiting for its sender.
WAITING_NOTE = "waiting for the sender's next batch or seal"
#: A progressive reception waits this long for the next part before other packages get
#: their turn (a part arriving later moves the inbox cursor and brings the package back).
PAUSE_SECONDS = 5.0
#: With nothing else to do, the hub holds the inbox cursor request this long at most,
#: answering as soon as a package arrives.
LONG_POLL_SECONDS = 2.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS packages (
    id TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    state TEXT NOT NULL,            -- receiving, received, delivered, skipped, failed
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    error TEXT,
    items INTEGER,
    bytes INTEGER,
    seen REAL NOT NULL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS deliveries (
    package_id TEXT NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL,            -- pending, done
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    error TEXT,
    report TEXT,
    finished REAL,
    PRIMARY KEY (package_id, destination)
);
CREATE INDEX IF NOT EXISTS packages_state ON packages (state);
"""


def package_from_folder(path: Path) -> Package:
    """The package described by a received folder's (already verified) manifest."""
    signed = json.loads((path / MANIFEST_NAME).read_text("utf-8"))
    document = signed["document"]
    return Package(
        id=document["package"],
        sender=document["sender"],
        recipients=[Recipient(r) for r in document.get("recipients", [])],
        items=[Item.from_dict(i) for i in document.get("items", [])],
        state="delivered",
        studies=document.get("studies", []),
    )


class InboundDelivery:
    """Polls the inbox of the gateway's facility and feeds its destinations.

    :param gateway: the gateway (client, home, destinations, state folder).
    """

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.path = gateway.state_dir / "inbound.db"
        self.spool = gateway.state_dir / "spool"
        self._journal = JournalConnections(self.path, SCHEMA)
        self._poll_failures = 0
        self._next_poll = 0.0
        self._last_poll_error = ""
        self._cursor: str | None = None
        self._has_cursor = True
        self._full_list_at = 0.0
        self._swept = False
        #: whether the hub has manifest parts (it lists each package's state)
        self._hub_progressive = True
        #: the package a receive or a delivery is working on (read by metrics scrapes)
        self.working: str | None = None
        attempts = gateway.settings.get("max_receive_attempts", MAX_RECEIVE_ATTEMPTS)
        if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 1:
            raise ConfigError("[gateway] max_receive_attempts must be a whole number of at least 1")
        self.max_attempts = attempts
        #: destinations that take verified batches before the seal (``deliver_verified``)
        self.progressive: list[ProgressiveDestination] = [
            cast("ProgressiveDestination", d)
            for d in gateway.destinations
            if gateway.progressive
            and callable(getattr(d, "deliver_verified", None))
            and getattr(d, "progressive", True)
        ]

    @property
    def db(self) -> sqlite3.Connection:
        return self._journal.get()

    # ------------------------------------------------------------------ the loop
    def tick(self) -> None:
        """One round: list the inbox, receive new packages, run due deliveries."""
        if not self._swept:
            self._sweep_spool()
        now = time_now()
        if now >= self._next_poll:
            self._poll(now)
        for row in self.db.execute(
            "SELECT id FROM packages WHERE state = 'receiving' AND next_attempt <= ? ORDER BY seen",
            (now,),
        ).fetchall():
            self.working = row["id"]
            try:
                self._receive(row["id"])
            finally:
                self.working = None
            self._deliver_due()  # each package goes on as soon as it is in
        self._deliver_due()

    def _poll(self, now: float) -> None:
        client = self.gateway.client
        try:
            cursor = self._cursor_of(client, wait=self._long_poll_seconds())
            if cursor is not None and cursor == self._cursor and now < self._full_list_at:
                self._reachable()
                return
            listing = client.inbox(progressive=True) if self.progressive else client.inbox()
        except (HubUnavailable, AuthenticationError) as exc:
            self._poll_failures += 1
            delay = retry_delay(self._poll_failures, self.gateway.retry_max_seconds)
            self._next_poll = now + delay
            if exc.message != self._last_poll_error:
                log_event(
                    log,
                    "inbox.unreachable",
                    logging.WARNING,
                    reason=exc.message,
                    retry_seconds=round(delay, 1),
                )
                self._last_poll_error = exc.message
            return
        self._reachable()
        self._note(listing, now)
        self._cursor, self._full_list_at = cursor, now + FULL_LIST_SECONDS

    def _long_poll_seconds(self) -> float:
        """How long the hub may hold the cursor request: only while nothing else is due."""
        if self._cursor is None:
            return 0.0
        busy = self.db.execute(
            "SELECT 1 FROM packages WHERE state IN ('receiving', 'received') LIMIT 1"
        ).fetchone()
        return 0.0 if busy else LONG_POLL_SECONDS

    def _cursor_of(self, client: Any, wait: float = 0.0) -> str | None:
        """The hub's inbox fingerprint; ``None`` from a hub too old to have one.

        :param wait: let the hub answer only when it differs from the last one, or after
            this many seconds (a new package is then seen at once, not a poll later).
        """
        if not self._has_cursor:
            return None
        try:
            kw: dict[str, Any] = {"since": self._cursor, "wait": wait} if wait else {}
            if self.progressive:
                return client.inbox_cursor(progressive=True, **kw)
            return client.inbox_cursor(**kw)
        except NotFoundError:
            self._has_cursor = False
            return None

    def _reachable(self) -> None:
        if self._poll_failures:
            log_event(log, "inbox.reachable", failures=self._poll_failures)
        self._poll_failures, self._next_poll, self._last_poll_error = 0, 0.0, ""

    def _note(self, listing: list[dict[str, Any]], now: float) -> None:
        """Journal every package of the listing not seen before."""
        if listing:  # a hub from before progressive packages lists no state
            self._hub_progressive = all("state" in entry for entry in listing)
        known = {
            r["id"]: (r["state"] == "receiving" and r["error"] == WAITING_NOTE, r["items"])
            for r in self.db.execute("SELECT id, state, items, error FROM packages")
        }
        listed = {str(entry.get("id", "")) for entry in listing}
        for package_id, (waiting, _items) in known.items():
            if waiting and package_id not in listed:  # aborted or expired: find out now
                self.db.execute("UPDATE packages SET next_attempt = 0 WHERE id = ?", (package_id,))
        for entry in sorted(listing, key=lambda e: e.get("sealed") or ""):
            package_id, sender = str(entry.get("id", "")), str(entry.get("from", ""))
            if package_id in known:
                waiting, items = known[package_id]
                if waiting and (entry.get("items") != items or entry.get("state") == "sealed"):
                    # a progressive package got a part or its seal: take it now
                    self.db.execute(
                        "UPDATE packages SET items = ?, bytes = ?, next_attempt = 0 WHERE id = ?",
                        (entry.get("items"), entry.get("size"), package_id),
                    )
                continue
            if not PACKAGE_ID_RE.match(package_id) or not is_valid_address(sender):
                log_event(log, "inbox.refused_entry", logging.ERROR, reason="malformed id")
                continue
            skip = bool(entry.get("delivered")) and not self.gateway.deliver_received
            self.db.execute(
                "INSERT INTO packages (id, sender, state, seen, items, bytes, finished) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    package_id,
                    sender,
                    "skipped" if skip else "receiving",
                    now,
                    entry.get("items"),
                    entry.get("size"),
                    now if skip else None,
                ),
            )
            fields: dict[str, Any] = {
                "package": package_id,
                "sender": sender,
                "items": entry.get("items"),
                "bytes": entry.get("size"),
            }
            if skip:
                fields["reason"] = "already received by another client"
            log_event(log, "package.skipped" if skip else "package.arrived", **fields)

    def _sweep_spool(self) -> None:
        """Remove spool folders a crash left behind (packages already finished), and
        forget packages finished long ago."""
        self.db.execute(
            "DELETE FROM deliveries WHERE package_id IN (SELECT id FROM packages WHERE "
            "state IN ('delivered', 'skipped', 'failed') AND finished < ?)",
            (time_now() - FORGET_AFTER_DAYS * 86400,),
        )
        self.db.execute(
            "DELETE FROM packages WHERE state IN ('delivered', 'skipped', 'failed') "
            "AND finished < ?",
            (time_now() - FORGET_AFTER_DAYS * 86400,),
        )
        if self.spool.exists():
            keep = {
                r["id"]
                for r in self.db.execute(
                    "SELECT id FROM packages WHERE state IN ('receiving', 'received')"
                )
            }
            keep |= {staging_folder(self.spool, k).name for k in keep}
            for entry in self.spool.iterdir():
                if entry.name not in keep:
                    shutil.rmtree(entry, ignore_errors=True)
        self._swept = True

    # ------------------------------------------------------------------ receiving
    def _receive(self, package_id: str) -> None:
        final = self.spool / package_id
        self.spool.mkdir(parents=True, exist_ok=True, mode=0o700)
        # an earlier attempt that died before it was journaled: its receipt may not
        # have been posted, so fetch and verify again rather than trust it
        if final.exists():
            shutil.rmtree(final)
        for leftover in self.spool.glob(f".{package_id}.partial-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        started = time_now()
        try:
            if self.progressive and self._hub_progressive:
                received = self._reception(package_id).run()
            else:
                received = receive_package(
                    package_id,
                    self.spool,
                    client=self.gateway.client,
                    home=self.gateway.home,
                    parallel=self.gateway.parallel,
                )
        except PackageNotSealed:  # the sender pauses: others get their turn
            self.db.execute(
                "UPDATE packages SET next_attempt = ?, error = ? WHERE id = ?",
                (time_now() + NOT_SEALED_RETRY_SECONDS, WAITING_NOTE, package_id),
            )
            return
        except NotFoundError as exc:
            self._give_up(package_id, exc.message)
            return
        except EmixError as exc:
            self._retry_receive(package_id, exc.message, permanent_after=self.max_attempts)
            return
        except OSError as exc:
            self._retry_receive(package_id, f"cannot write the spool ({exc.strerror})")
            return
        except Exception as exc:  # a crafted package must never stop the others
            log.exception("package.receive_crashed", extra={"emix": {"package": package_id}})
            self._retry_receive(
                package_id,
                f"the package could not be read ({type(exc).__name__}); ask the sender",
                permanent_after=self.max_attempts,
            )
            return
        names = [d.name for d in self.gateway.destinations]
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute(
                "UPDATE packages SET state = 'received', error = NULL, items = ?, bytes = ? "
                "WHERE id = ?",
                (len(received.items), sum(i.size for i, _ in received.items), package_id),
            )
            self.db.executemany(
                "INSERT OR IGNORE INTO deliveries (package_id, destination, state) "
                "VALUES (?, ?, 'pending')",
                [(package_id, name) for name in names],
            )
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        log_event(
            log,
            "package.received",
            package=package_id,
            sender=received.sender,
            items=len(received.items),
            bytes=sum(i.size for i, _ in received.items),
            seconds=round(time_now() - started, 3),
        )

    def _reception(self, package_id: str) -> ProgressiveReception:
        """A progressive reception whose verified batches go to the progressive destinations."""
        sender = self.db.execute(
            "SELECT sender FROM packages WHERE id = ?", (package_id,)
        ).fetchone()["sender"]

        def hand_over(verified: list[tuple[Item, Path]]) -> None:
            package = Package(id=package_id, sender=sender, items=[i for i, _ in verified])
            staging = staging_folder(self.spool, package_id)
            for destination in self.progressive:
                try:
                    destination.deliver_verified(package, staging)
                except Exception as exc:  # the delivery after the seal covers it
                    log_event(
                        log,
                        "batch.delivery_failed",
                        logging.WARNING,
                        package=package_id,
                        destination=destination.name,
                        reason=exc.message if isinstance(exc, EmixError) else type(exc).__name__,
                    )
                    continue
                log_event(
                    log,
                    "batch.delivered",
                    package=package_id,
                    destination=destination.name,
                    items=len(verified),
                )

        return ProgressiveReception(
            package_id,
            self.spool,
            client=self.gateway.client,
            home=self.gateway.home,
            on_verified=hand_over,
            parallel=self.gateway.parallel,
            idle=PAUSE_SECONDS,
        )

    def _retry_receive(self, package_id: str, reason: str, permanent_after: int = 0) -> None:
        row = self.db.execute(
            "SELECT attempts FROM packages WHERE id = ?", (package_id,)
        ).fetchone()
        attempts = (row["attempts"] if row else 0) + 1
        if permanent_after and attempts >= permanent_after:
            self._give_up(package_id, reason)
            return
        delay = retry_delay(attempts, self.gateway.retry_max_seconds)
        self.db.execute(
            "UPDATE packages SET attempts = ?, next_attempt = ?, error = ? WHERE id = ?",
            (attempts, time_now() + delay, reason, package_id),
        )
        log_event(
            log,
            "package.receive_failed",
            logging.WARNING,
            package=package_id,
            reason=reason,
            attempt=attempts,
            retry_seconds=round(delay, 1),
        )

    def _give_up(self, package_id: str, reason: str) -> None:
        staging = staging_folder(self.spool, package_id)
        if staging.exists():
            self._record_partial(package_id, staging, reason)
            shutil.rmtree(staging, ignore_errors=True)
        self.db.execute(
            "UPDATE packages SET state = 'failed', error = ?, finished = ?, "
            "attempts = attempts + 1 WHERE id = ?",
            (reason, time_now(), package_id),
        )
        log_event(log, "package.failed", logging.ERROR, package=package_id, reason=reason)
        self._audit_failure(package_id, f"gateway could not receive the package: {reason}")

    def _audit_failure(self, package_id: str, detail: str) -> None:
        """A package this gateway gave up on, in its audit trail (a serious failure)."""
        self.gateway.home.audit(
            AuditEvent(
                event_type="instances-transferred",
                action=AuditAction.CREATE,
                outcome=AuditOutcome.SERIOUS_FAILURE,
                actor="system",
                package_id=package_id,
                detail=detail,
            )
        )

    def _record_partial(self, package_id: str, staging: Path, reason: str) -> None:
        """A package given up after some of its verified batches went to destinations:
        say what, in the log and the audit trail (those items stay where they were stored)."""
        taken = len(Progress.load(staging).items)
        if not taken or not self.progressive:
            return
        names = ", ".join(d.name for d in self.progressive)
        log_event(
            log,
            "package.partially_delivered",
            logging.ERROR,
            package=package_id,
            items=taken,
            destinations=[d.name for d in self.progressive],
            reason=reason,
        )
        self._audit_failure(
            package_id,
            f"package never completed: {taken} verified items were stored into {names} "
            f"before it was given up ({reason}); they stay there",
        )

    # ------------------------------------------------------------------ delivering
    def _deliver_due(self) -> None:
        now = time_now()
        destinations = {d.name: d for d in self.gateway.destinations}
        rows = self.db.execute(
            "SELECT d.package_id, d.destination, d.attempts FROM deliveries d "
            "JOIN packages p ON p.id = d.package_id "
            "WHERE p.state = 'received' AND d.state = 'pending' AND d.next_attempt <= ? "
            "ORDER BY p.seen",
            (now,),
        ).fetchall()
        touched: set[str] = set()
        packages: dict[str, Package] = {}
        for row in rows:
            destination = destinations.get(row["destination"])
            if destination is None:  # removed from gateway.toml since
                continue
            package_id = row["package_id"]
            touched.add(package_id)
            folder = self.spool / package_id
            try:
                package = packages.get(package_id) or package_from_folder(folder)
            except (OSError, ValueError, KeyError, TypeError):
                # the spool copy is gone or damaged: receive the package again
                self.db.execute(
                    "UPDATE packages SET state = 'receiving', next_attempt = 0 WHERE id = ?",
                    (package_id,),
                )
                continue
            packages[package_id] = package
            self.working = package_id
            try:
                self._deliver_one(destination, package, folder, row["attempts"])
            finally:
                self.working = None
        for package_id in touched:
            self._finish_if_done(package_id, set(destinations))

    def _deliver_one(
        self, destination: Destination, package: Package, folder: Path, attempts: int
    ) -> None:
        started = time_now()
        try:
            report = destination.deliver(package, folder)
        except Exception as exc:
            attempts += 1
            delay = retry_delay(attempts, self.gateway.retry_max_seconds)
            reason = exc.message if isinstance(exc, EmixError) else type(exc).__name__
            if not isinstance(exc, EmixError):
                log.exception(
                    "destination.crashed", extra={"emix": {"destination": destination.name}}
                )
            self.db.execute(
                "UPDATE deliveries SET attempts = ?, next_attempt = ?, error = ? "
                "WHERE package_id = ? AND destination = ?",
                (attempts, time_now() + delay, reason, package.id, destination.name),
            )
            log_event(
                log,
                "delivery.failed",
                logging.WARNING,
                package=package.id,
                destination=destination.name,
                reason=reason,
                attempt=attempts,
                retry_seconds=round(delay, 1),
            )
            return
        self.db.execute(
            "UPDATE deliveries SET state = 'done', error = NULL, report = ?, finished = ? "
            "WHERE package_id = ? AND destination = ?",
            (json.dumps(report, default=str), time_now(), package.id, destination.name),
        )
        log_event(
            log,
            "package.delivered",
            package=package.id,
            sender=package.sender,
            destination=destination.name,
            items=len(package.items),
            seconds=round(time_now() - started, 3),
        )
        self.gateway.home.audit(
            AuditEvent(
                event_type="instances-transferred",
                action=AuditAction.CREATE,
                outcome=AuditOutcome.SUCCESS,
                actor="system",
                package_id=package.id,
                phi={"studies": [s.get("study_uid") for s in package.studies]},
                detail=f"gateway delivered {len(package.items)} items from {package.sender} "
                f"to destination {destination.name}",
            )
        )

    def _finish_if_done(self, package_id: str, configured: set[str]) -> None:
        pending = [
            r["destination"]
            for r in self.db.execute(
                "SELECT destination FROM deliveries WHERE package_id = ? AND state != 'done'",
                (package_id,),
            )
            if r["destination"] in configured
        ]
        if pending:
            return
        self.db.execute(
            "UPDATE packages SET state = 'delivered', finished = ? WHERE id = ?",
            (time_now(), package_id),
        )
        shutil.rmtree(self.spool / package_id, ignore_errors=True)

    # ------------------------------------------------------------------ status
    def queue_depths(self) -> dict[str, int]:
        """Packages waiting (``pending``), being received or delivered now (``in_flight``),
        given up (``failed``), and among the waiting ones those failing and retried
        (``retrying``): the gauges of ``emix_gateway_queue_depth``."""
        depths = {"pending": 0, "in_flight": 0, "failed": 0, "retrying": 0}
        if not self.path.exists():
            return depths
        counts = {
            r["state"]: r["n"]
            for r in self.db.execute("SELECT state, COUNT(*) AS n FROM packages GROUP BY state")
        }
        busy = 1 if self.working else 0
        depths["in_flight"] = busy
        depths["pending"] = max(counts.get("receiving", 0) + counts.get("received", 0) - busy, 0)
        depths["failed"] = counts.get("failed", 0)
        depths["retrying"] = self.db.execute(
            "SELECT COUNT(*) FROM packages p WHERE (p.state = 'receiving' AND p.attempts > 0) "
            "OR (p.state = 'received' AND EXISTS (SELECT 1 FROM deliveries d WHERE "
            "d.package_id = p.id AND d.state = 'pending' AND d.attempts > 0))"
        ).fetchone()[0]
        return depths

    def status(self) -> dict[str, Any]:
        """Counts per state and the deliveries that are failing, with their reason."""
        if not self.path.exists():
            return {"packages": {}, "failing": [], "failed": []}
        counts = {
            r["state"]: r["n"]
            for r in self.db.execute("SELECT state, COUNT(*) AS n FROM packages GROUP BY state")
        }
        failing = [
            {
                "package": r["package_id"],
                "destination": r["destination"],
                "attempts": r["attempts"],
                "error": r["error"],
            }
            for r in self.db.execute(
                "SELECT * FROM deliveries WHERE state = 'pending' AND attempts > 0 "
                "ORDER BY package_id"
            )
        ]
        failing += [
            {
                "package": r["id"],
                "destination": None,
                "attempts": r["attempts"],
                "error": r["error"],
            }
            for r in self.db.execute(
                "SELECT * FROM packages WHERE state = 'receiving' AND attempts > 0"
            )
        ]
        failed = [
            {
                "package": r["id"],
                "sender": r["sender"],
                "attempts": r["attempts"],
                "error": r["error"],
            }
            for r in self.db.execute("SELECT * FROM packages WHERE state = 'failed' ORDER BY seen")
        ]
        return {"packages": counts, "failing": failing, "failed": failed}
