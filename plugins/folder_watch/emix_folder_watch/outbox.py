"""The drop folder source: watch a folder, send what lands in it, exactly once.

One worker thread does everything in order: notice files (watchdog events plus a
periodic rescan), wait until each is complete, classify it, journal it, group files
into packages, send them, and move them out of the folder once the hub sealed the
package. Every decision is journaled before it is acted upon (see
:mod:`emix_folder_watch.journal`), so a ``kill -9`` at any moment and a restart finish
the work without sending anything twice or leaving anything behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from emix_core import (
    AuthenticationError,
    ConfigError,
    EmixError,
    HubUnavailable,
    NotFoundError,
    is_valid_address,
    log_event,
    retry_delay,
    time_now,
)
from emix_folder_watch.files import (
    fsync_dir,
    is_ignored_name,
    is_in_progress,
    move_out,
    prune_empty_dirs,
    real_folder,
    refusal,
    unique_target,
    walk,
    write_error_note,
)
from emix_folder_watch.grouping import Unsettled, classify_file, plan_batches
from emix_folder_watch.journal import FileRow, OutboxJournal
from emix_folder_watch.settings import outbox_settings, require_folder

if TYPE_CHECKING:
    from emix_core import Gateway

log = logging.getLogger("emix.folder_watch")

#: How often the worker wakes up without an event (seconds).
TICK = 0.2
#: Errors a sender cannot fix by changing the files: wait for the hub or the admin.
TRANSIENT = (HubUnavailable, AuthenticationError, ConfigError)
#: A file whose upload failed is tried in this many packages before it is refused.
MAX_FILE_ATTEMPTS = 3
#: How long a package left open by a crash may still be sealed by a request in flight.
SEAL_GRACE_SECONDS = 5.0
#: Finished files are remembered this long: a file dropped again within it is a duplicate.
REMEMBER_DAYS = 90


@dataclass
class _Candidate:
    """A file seen in the folder, not yet complete."""

    signature: tuple[int, int, int, int]
    arrived: float
    stable_since: float
    complete: bool = False


def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


class FolderSource:
    """A watched drop folder (``[[sources]] kind = "folder"``).

    :param raw: the ``[[sources]]`` table.
    :param gateway: the gateway it sends through.
    """

    kind = "folder"

    def __init__(self, raw: dict[str, Any], gateway: Gateway) -> None:
        self.settings = outbox_settings(raw, gateway)
        self.name = self.settings.name
        self.gateway = gateway
        self.root = self.settings.path
        slug = re.sub(r"[^A-Za-z0-9_-]", "_", self.name)
        self.journal = OutboxJournal(gateway.state_dir / f"folder-{slug}.db")
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._events: set[str] = set()
        self._renamed: set[str] = set()
        self._candidates: dict[str, _Candidate] = {}
        self._active: set[str] = set()
        self._thread: threading.Thread | None = None
        self._observer: Any = None
        self._rescan_every = self.settings.rescan_every
        self._next_rescan = 0.0
        self._next_prune = 0.0
        self._hub_down_until = 0.0
        # Completed work cycles since start, published for `emix gateway status`, so that
        # "nothing happened" can be checked against cycles that really ran.
        self._heartbeat = self.journal.path.with_suffix(".cycles")
        self._cycles = 0
        self._last_beat = 0.0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        require_folder(self.root, self.settings.create, f"[[sources]] {self.name!r}", self.gateway)
        for folder in (self.settings.sent, self.settings.failed):
            assert folder is not None
            folder.mkdir(parents=True, exist_ok=True)
        self._stop.clear()
        if self.settings.events:
            self._start_observer()
        self._thread = threading.Thread(target=self._run, name=f"emix-folder-{self.name}")
        self._thread.daemon = True
        self._thread.start()

    def _start_observer(self) -> None:
        from watchdog.observers import Observer

        from emix_folder_watch.events import Wakeup

        observer = Observer()
        try:
            observer.schedule(Wakeup(self), str(self.root), recursive=True)
            observer.start()
        except OSError as exc:  # e.g. the inotify watch limit: rescans still work
            log_event(
                log,
                "folder.events_unavailable",
                logging.WARNING,
                source=self.name,
                reason=exc.strerror or type(exc).__name__,
            )
            self._rescan_every = min(self._rescan_every, 1.0)
            return
        self._observer = observer

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=10)
            self._observer = None
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    def queue_depths(self) -> dict[str, int]:
        """Files pending, being sent and failed, for the gateway's metrics."""
        if not self.journal.path.exists():
            return {"pending": 0, "in_flight": 0, "failed": 0, "retrying": 0}
        return self.journal.queue_depths()

    def status(self) -> dict[str, Any]:
        summary = self.journal.summary() if self.journal.path.exists() else {}
        return {
            "kind": self.kind,
            "path": str(self.root),
            "sent_folder": str(self.settings.sent),
            "failed_folder": str(self.settings.failed),
            "events": self.settings.events,
            "cycles_since_start": _read_count(self._heartbeat),
            **summary,
        }

    def notice(self, path: str, renamed_from_temporary: bool = False) -> None:
        """Called from watchdog's thread: something changed at ``path``."""
        with self._lock:
            self._events.add(path)
            if renamed_from_temporary:
                self._renamed.add(path)
        self._wake.set()

    # ------------------------------------------------------------------ the worker
    def _run(self) -> None:
        failures = 0
        self._active = self.journal.active_paths()
        self.journal.restart_quiet_windows()
        while not self._stop.is_set():
            try:
                self._cycle()
                failures = 0
                self._beat()
            except Exception:  # keep watching: log, back off, try again
                failures += 1
                log.exception("folder.cycle_failed", extra={"emix": {"source": self.name}})
                self._stop.wait(retry_delay(failures, 30))
            self._wake.wait(TICK)
            self._wake.clear()

    def _beat(self) -> None:
        """Count a completed cycle; publish the count at most twice a second."""
        self._cycles += 1
        now = time.monotonic()
        if now - self._last_beat < 0.5:
            return
        self._last_beat = now
        temp = self._heartbeat.with_suffix(".cycles.tmp")
        temp.write_text(str(self._cycles))
        os.replace(temp, self._heartbeat)

    def _cycle(self) -> None:
        now = time.monotonic()
        if now >= self._next_prune:
            self.journal.prune(REMEMBER_DAYS)
            self._next_prune = now + 3600
        if now >= self._next_rescan:
            for path in walk(self.root):
                self._observe(path)
            self._next_rescan = now + self._rescan_every
        with self._lock:
            events, self._events = self._events, set()
            renamed, self._renamed = self._renamed, set()
        for event in events:
            self._observe(Path(event), complete=event in renamed)
        self._settle()
        if not self._stop.is_set():
            self._send_ready()
        self._move_decided()

    def _relative(self, path: Path) -> str | None:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return None

    def _observe(self, path: Path, complete: bool = False) -> None:
        relative = self._relative(path)
        if not relative or relative == "." or is_in_progress(relative):
            return
        if relative in self._active:
            return
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            self._candidates.pop(relative, None)
            return
        if stat.S_ISDIR(st.st_mode):  # a folder moved in at once: its files arrive with it
            for child in walk(path):
                self._observe(child, complete)
            return
        signature = _signature(st)
        candidate = self._candidates.get(relative)
        if candidate is None:
            self._candidates[relative] = _Candidate(
                signature,
                time_now(),
                time.monotonic(),
                complete or not stat.S_ISREG(st.st_mode),
            )
        elif candidate.signature != signature:
            candidate.signature = signature
            candidate.stable_since = time.monotonic()
            candidate.complete = complete

    def _settle(self) -> None:
        """Take every file that became complete (journaled in one transaction)."""
        with self.journal.transaction():
            self._settle_all()

    def _settle_all(self) -> None:
        now = time.monotonic()
        for relative, candidate in list(self._candidates.items()):
            settled = now - candidate.stable_since >= self.settings.file_settle_seconds
            if not (candidate.complete or settled):
                continue
            path = self.root / relative
            try:
                st = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                del self._candidates[relative]
                continue
            if _signature(st) != candidate.signature and stat.S_ISREG(st.st_mode):
                candidate.signature, candidate.stable_since = _signature(st), now
                candidate.complete = False
                continue
            del self._candidates[relative]
            self._take(relative, path, st, candidate.arrived)

    # ------------------------------------------------------------------ taking a file
    def _route(self, relative: str) -> tuple[str, str | None]:
        """``(recipients, None)``, or ``("", reason)`` when the file has no recipient."""
        if self.settings.to:
            return ",".join(sorted(set(self.settings.to))), None
        parts = PurePosixPath(relative).parts
        if len(parts) < 2:
            return "", (
                "files must be put in a folder named after the recipient facility: "
                f'{self.root}/<recipient-address>/ (or set to = "address" in gateway.toml)'
            )
        if not is_valid_address(parts[0]):
            return "", (
                f"the folder {parts[0]!r} is not a facility address (lowercase letters, "
                "digits and '-'): name the folder after the recipient facility"
            )
        return parts[0], None

    def _take(self, relative: str, path: Path, st: os.stat_result, arrived: float) -> None:
        recipients, reason = self._route(relative)
        code = "route" if reason else "refused"
        reason = reason or refusal(path, self.root, st, self.settings.max_file_bytes)
        common = {
            "path": relative,
            "recipients": recipients,
            "dev": st.st_dev,
            "ino": st.st_ino,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "arrived": arrived,
        }
        if reason is None and is_ignored_name(path.name):
            self._record(common, kind="ignored", state="moving", outcome="ignored")
            return
        if reason is None:
            try:
                found = classify_file(path, relative, self.gateway.pm)
            except EmixError as exc:
                reason, code = exc.message, exc.code
            except FileNotFoundError:
                return
            except OSError as exc:
                reason, code = f"the file cannot be read ({exc.strerror})", "unreadable"
        if reason is not None:
            self._record(common, kind="refused", state="moving", outcome="failed", error=reason)
            log_event(
                log, "file.refused", logging.WARNING, source=self.name, to=recipients, reason=code
            )
            return
        values = {**common, "kind": found.kind, "study": found.study, "accession": found.accession}
        values.update(identity=found.identity, document=found.document)
        if self.journal.is_known(recipients, found.identity):
            self._record(values, state="moving", outcome="duplicate")
            log_event(log, "file.duplicate", source=self.name, to=recipients)
            return
        self._record(values, state="pending")

    def _record(self, values: dict[str, Any], **more: Any) -> None:
        self.journal.add_file(**values, **more)
        self._active.add(values["path"])

    # ------------------------------------------------------------------ sending
    def _send_ready(self) -> None:
        now = time_now()
        if now < self._hub_down_until:
            return
        for batch in self.journal.sending_batches():
            if batch["next_attempt"] > now:
                continue
            previous = (batch["package"], bool(batch["sealing"])) if batch["package"] else None
            if not self._send_batch(batch["id"], batch["recipients"], previous):
                return  # the hub is down: later
        unsettled = [
            Unsettled(self._route(r)[0], r, c.arrived) for r, c in self._candidates.items()
        ]
        settle = self.settings.settle_seconds
        plan = plan_batches(self.journal.pending(), unsettled, now, settle, max(60.0, 10 * settle))
        if plan.orphans:
            self.journal.decide(
                [r.id for r in plan.orphans],
                "failed",
                "a sidecar (.emix.toml) whose document is not in the folder; put the document "
                "and its sidecar in the folder together",
            )
        for planned in plan.batches:
            rows = self._unchanged(planned)
            if not rows:
                continue
            batch_id = self.journal.create_batch(rows[0].recipients, [r.id for r in rows])
            if not self._send_batch(batch_id, rows[0].recipients, None):
                return

    def _unchanged(self, rows: list[FileRow]) -> list[FileRow]:
        """Rows whose file is still the one classified; forget the others (seen anew)."""
        keep: list[FileRow] = []
        changed: list[FileRow] = []
        for row in rows:
            try:
                st = os.lstat(self.root / row.path)
                same = (st.st_ino, st.st_size, st.st_mtime_ns) == (row.ino, row.size, row.mtime_ns)
            except OSError:
                same = False
            (keep if same else changed).append(row)
        if changed:
            self.journal.forget([r.id for r in changed])
            self._active -= {r.path for r in changed}
        return keep

    def _send_batch(self, batch: int, recipients: str, previous: tuple[str, bool] | None) -> bool:
        """Send one batch (resolving an earlier attempt first); False when the hub is down.

        :param previous: the package of an earlier attempt, and whether its seal request
            may have left.
        """
        rows = self.journal.batch_files(batch)
        if not rows:
            self.journal.close_batch(batch, package_id=None)
            return True
        if previous is not None:
            outcome = self._resolve(*previous)
            if outcome == "unknown":
                return self._postpone(batch, "the hub cannot tell whether the last try arrived")
            if outcome == "sealed":
                self._close_sent(batch, previous[0], rows, recovered=True)
                return True
            self.journal.set_package(batch, None)
        files = [r for r in rows if r.kind in ("dicom", "document")]
        started = time.monotonic()
        log_event(
            log,
            "batch.sending",
            source=self.name,
            to=recipients,
            files=len(files),
            bytes=sum(r.size or 0 for r in files),
        )
        try:
            result = self.gateway.send(
                [self.root / r.path for r in files],
                recipients.split(","),
                on_package_created=lambda package_id: self.journal.set_package(batch, package_id),
                on_seal_requested=lambda _package_id: self.journal.set_sealing(batch),
                expires_days=self.settings.expires_days,
            )
        except TRANSIENT as exc:
            return self._postpone(batch, exc.message)
        except EmixError as exc:
            package = self._batch_package(batch)
            if package is not None:  # it may have been sealed: find out next round
                return self._postpone(batch, exc.message, permanent=True)
            self._fail_batch(batch, rows, exc)
            return True
        by_path = {str(self.root / r.path): r for r in rows}
        sent = [by_path[str(p)].id for p in result.sent if str(p) in by_path]
        duplicates = [by_path[str(p)].id for p in result.skipped if str(p) in by_path]
        failures = {
            by_path[str(f.path)].id: f.error for f in result.failed if str(f.path) in by_path
        }
        attempts = self.journal.attempts_of(list(failures)) if failures else {}
        retry = {i: e for i, e in failures.items() if attempts.get(i, 0) + 1 < MAX_FILE_ATTEMPTS}
        failed = {i: e for i, e in failures.items() if i not in retry}
        self._with_sidecars(rows, sent, retry, failed)
        decided = {*sent, *duplicates, *retry, *failed}
        retry.update({r.id: "not sent; trying again" for r in rows if r.id not in decided})
        self.journal.close_batch(
            batch,
            package_id=result.package_id,
            sent=sent,
            duplicates=duplicates,
            retry=retry,
            failed=failed,
            stats=(result.items, result.bytes, round(time.monotonic() - started, 3)),
        )
        if result.package_id:
            log_event(
                log,
                "package.sent",
                source=self.name,
                package=result.package_id,
                to=recipients,
                items=result.items,
                bytes=result.bytes,
                seconds=round(time.monotonic() - started, 3),
                not_sent=len(failures),
            )
        return True

    def _with_sidecars(
        self, rows: list[FileRow], sent: list[int], retry: dict[int, str], failed: dict[int, str]
    ) -> None:
        """A sidecar shares the fate of its document."""
        by_path = {r.path: r.id for r in rows}
        for row in rows:
            if row.kind != "sidecar":
                continue
            document = by_path.get(row.document or "")
            if document in retry:
                retry[row.id] = retry[document]
            elif document in failed:
                failed[row.id] = failed[document]
            else:
                sent.append(row.id)

    def _close_sent(
        self, batch: int, package: str, rows: list[FileRow], *, recovered: bool
    ) -> None:
        self.journal.close_batch(batch, package_id=package, sent=[r.id for r in rows])
        log_event(log, "package.sent", source=self.name, package=package, recovered=recovered)

    def _batch_package(self, batch: int) -> str | None:
        row = self.journal.db.execute(
            "SELECT package FROM batches WHERE id = ?", (batch,)
        ).fetchone()
        return row["package"] if row else None

    def _resolve(self, package: str, sealing: bool) -> str:
        """Did an earlier attempt seal ``package``? ``sealed``, ``abandoned`` or ``unknown``.

        A package still open is abandoned (never sealed, never visible) and the files go
        in a new one; if the seal request had left, the hub gets a grace period to finish it.
        """
        deadline = time.monotonic() + (SEAL_GRACE_SECONDS if sealing else 0)
        while True:
            try:
                state = self.gateway.client.status(package).get("state")
            except NotFoundError:
                return "abandoned"
            except EmixError:
                return "unknown"
            if state != "open":
                return "sealed"
            if time.monotonic() >= deadline or self._stop.is_set():
                log_event(log, "batch.abandoned_open_package", source=self.name, package=package)
                self._abort(package)
                return "abandoned"
            time.sleep(0.5)

    def _abort(self, package: str) -> None:
        """Abort an abandoned open package on the hub: its batches may have reached a
        receiving gateway already (manifest parts), which then records it as given up
        instead of waiting for it; its files go in a new package."""
        with contextlib.suppress(EmixError):  # gone already, or the hub is down: it expires
            self.gateway.client.abort_package(package)

    def _postpone(self, batch: int, reason: str, permanent: bool = False) -> bool:
        row = self.journal.db.execute(
            "SELECT attempts FROM batches WHERE id = ?", (batch,)
        ).fetchone()
        attempts = (row["attempts"] if row else 0) + 1
        if permanent and attempts >= MAX_FILE_ATTEMPTS:
            self._fail_batch(batch, self.journal.batch_files(batch), EmixError(reason))
            return True
        delay = retry_delay(attempts, self.gateway.retry_max_seconds)
        self.journal.postpone(batch, attempts, time_now() + delay, reason)
        log_event(
            log,
            "batch.postponed",
            logging.WARNING,
            source=self.name,
            reason=reason,
            attempt=attempts,
            retry_seconds=round(delay, 1),
        )
        if not permanent:
            self._hub_down_until = time_now() + delay
        return permanent

    def _fail_batch(self, batch: int, rows: list[FileRow], exc: EmixError) -> None:
        reason = f"the package was refused: {exc.message}"
        self.journal.close_batch(batch, package_id=None, failed={r.id: reason for r in rows})
        log_event(log, "batch.refused", logging.ERROR, source=self.name, reason=exc.code)

    # ------------------------------------------------------------------ moving out
    def _move_decided(self) -> None:
        rows = self.journal.moving()
        if not rows:
            return
        delete = self.settings.after_send == "delete"
        taken: set[str] = set()
        targets = {}
        for row in rows:
            if row["target"] is None and not (delete and row["outcome"] != "failed"):
                folder = self.settings.failed if row["outcome"] == "failed" else self.settings.sent
                assert folder is not None
                targets[row["id"]] = unique_target(folder, row["path"], taken)
        if targets:
            self.journal.set_targets(targets)
        done: list[int] = []
        touched: set[Path] = set()
        for row in rows:
            try:
                touched.add(self._move_one(row, targets.get(row["id"]) or row["target"], delete))
            except FileExistsError:
                self.journal.set_targets({row["id"]: None})  # type: ignore[dict-item]
                continue
            except OSError as exc:
                log_event(
                    log,
                    "file.move_failed",
                    logging.ERROR,
                    source=self.name,
                    reason=exc.strerror or type(exc).__name__,
                )
                continue
            done.append(row["id"])
        for folder in touched:  # renames durable before the journal forgets them
            fsync_dir(folder)
        self.journal.finish(done)
        self._active -= {row["path"] for row in rows if row["id"] in set(done)}
        prune_empty_dirs(self.root, 0 if self.settings.to else 1)

    def _move_one(self, row: Any, target: str | None, delete: bool) -> Path:
        """Move (or delete) one decided file; return the folder whose entries changed."""
        source = self.root / row["path"]
        try:
            st = os.lstat(source)
            present = st.st_ino == row["ino"]  # else a new file took the name: leave it
        except FileNotFoundError:
            present = False
        failed = row["outcome"] == "failed"
        if delete and not failed:
            if present:
                os.unlink(source)
            return source.parent
        assert target is not None
        folder = self.settings.failed if failed else self.settings.sent
        assert folder is not None
        _, planted = real_folder(folder, PurePosixPath(target).parent)
        for _ in planted:
            log_event(log, "folder.link_quarantined", logging.WARNING, source=self.name)
        if present:
            move_out(source, folder / target)
        if failed and not os.path.lexists(folder / (target + ".error.txt")):
            write_error_note(folder / target, row["error"] or "unknown reason")
        return (folder / target).parent


def _read_count(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except (OSError, ValueError):
        return 0
