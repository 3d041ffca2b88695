"""Receiving a package batch by batch, while its sender still uploads (a receiving gateway).

The package's signed manifest parts (:mod:`emix_core.content.manifest_parts`) are read
as the sender posts them. For each part, in chain order: its signature is checked
against the sender's pinned key, its place in the chain, then its items are downloaded
and each one's size and SHA-256 compared with the part. Only then are they handed over
(``on_verified``), e.g. stored into a PACS; nothing unverified ever is.

When the package is sealed, the final manifest must close the chain and list every item
already taken with the same hash; the remaining items are fetched the same way, and the
package is finished as :func:`~emix_core.client.receiver.receive_package` does (one
rename, signed receipt, audit). A package that is not sealed never reaches the folder
the destinations read whole.

Progress (parts taken, the chain's head, the verified items) is kept in the staging
folder, so that a restart, or a sender that pauses, continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emix_core import crypto, frames
from emix_core.client.home import LocalHome
from emix_core.client.hub import HubClient
from emix_core.client.receiver import (
    ReceivedPackage,
    _fetch_batch,
    _inside,
    finish_reception,
    verified_manifest,
)
from emix_core.content.layout import item_relative_path
from emix_core.content.manifest_parts import (
    check_chain_head,
    check_items_kept,
    check_part,
    part_hash,
)
from emix_core.content.manifest_rules import check_document
from emix_core.errors import (
    ConflictError,
    IntegrityError,
    NotFoundError,
    PackageNotSealed,
)
from emix_core.model import AuditAction, AuditEvent, AuditOutcome, Item

log = logging.getLogger("emix.receive")

PROGRESS_NAME = ".emix-progress.json"
#: Downloads of a progressive reception go in runs of at most this many bytes.
RUN_BYTES = 8 * 1024 * 1024

#: Runs of verified items handed over at the same time.
HANDOFFS_IN_FLIGHT = 2

#: Called with verified items and where they are on disk; must not raise.
Handoff = Callable[[list[tuple[Item, Path]]], None]


@dataclass
class Progress:
    """What a progressive reception has verified so far (kept in the staging folder)."""

    parts: int = 0
    chain: str = ""
    sender: str = ""
    #: ``{item id: sha256}`` of items verified and on disk
    items: dict[int, str] = field(default_factory=dict)

    @classmethod
    def load(cls, folder: Path) -> Progress:
        try:
            data = json.loads((folder / PROGRESS_NAME).read_text("utf-8"))
            return cls(
                int(data["parts"]),
                str(data["chain"]),
                str(data["sender"]),
                {int(k): str(v) for k, v in data["items"].items()},
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return cls()

    def save(self, folder: Path) -> None:
        """Write atomically and durably: after a crash, either this or the last state."""
        temp = folder / (PROGRESS_NAME + ".tmp")
        body = {"parts": self.parts, "chain": self.chain, "sender": self.sender}
        body["items"] = {str(k): v for k, v in self.items.items()}
        with open(temp, "w", encoding="utf-8") as handle:
            json.dump(body, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, folder / PROGRESS_NAME)


def staging_folder(spool: Path, package_id: str) -> Path:
    """Where a progressive reception of ``package_id`` keeps its verified items."""
    return spool / f".{package_id}.progressive"


def contiguous_runs(items: list[Item], max_bytes: int = RUN_BYTES) -> list[list[Item]]:
    """Items by id in runs of consecutive ids (one download request each), size-capped."""
    runs: list[list[Item]] = []
    size = 0
    for item in sorted(items, key=lambda i: i.id):
        if (
            runs
            and runs[-1][-1].id + 1 == item.id
            and size + item.size <= max_bytes
            and len(runs[-1]) < frames.BATCH_ITEMS
        ):
            runs[-1].append(item)
            size += item.size
        else:
            runs.append([item])
            size = item.size
    return runs


class ProgressiveReception:
    """One progressive reception of a package into ``spool``.

    :param on_verified: receives each run of verified items, in threads of its own (two
        runs at a time, while the next ones download); it must not raise.
    :param wait: seconds one request to the hub waits for a new part.
    :param idle: give the turn back (:class:`PackageNotSealed`) after this long without
        a new part; the progress is kept and the next call continues.
    """

    def __init__(
        self,
        package_id: str,
        spool: Path,
        *,
        client: HubClient,
        home: LocalHome,
        on_verified: Handoff | None = None,
        parallel: int = 2,
        wait: float = 5.0,
        idle: float = 10.0,
    ) -> None:
        self.package_id = package_id
        self.spool = Path(spool).resolve()
        self.client = client
        self.home = home
        self.on_verified = on_verified
        self.parallel = max(parallel, 1)
        self.wait = wait
        self.idle = idle
        self.staging = staging_folder(self.spool, package_id)
        self._handoffs: list[Future[None]] = []
        self._handoff_pool: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ the whole run
    def run(self) -> ReceivedPackage:
        """Take parts until the package is sealed, then finish it.

        :raises PackageNotSealed: no new part for ``idle`` seconds (call again later).
        :raises NotFoundError: the package is gone (expired, aborted by its sender).
        :raises IntegrityError: a part, an item or the final manifest does not verify;
            the staging folder is removed (nothing unverified is kept).
        """
        final = self.spool / self.package_id
        if final.exists():
            raise ConflictError(f"{final} exists already; it is never overwritten")
        self.spool.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.staging.mkdir(exist_ok=True, mode=0o700)
        progress = Progress.load(self.staging)
        # two at once: a PACS stores one batch while it receives the next
        self._handoff_pool = ThreadPoolExecutor(
            max_workers=HANDOFFS_IN_FLIGHT, thread_name_prefix="emix-handoff"
        )
        try:
            state = self._take_parts(progress)
            if state != "sealed":
                raise NotFoundError("the package is gone (expired or aborted by its sender)")
            signed = verified_manifest(self.client, self.home, self.package_id)
            document = signed["document"]
            items = check_document(document)
            check_chain_head(document, progress.parts, progress.chain)
            check_items_kept(items, progress.items)
            rest = [i for i in items if i.id not in progress.items]
            self._fetch(rest)
            self._wait_handoffs()
        except IntegrityError:
            self._wait_handoffs()
            shutil.rmtree(self.staging, ignore_errors=True)
            raise
        finally:
            self._handoff_pool.shutdown(wait=True)
        (self.staging / PROGRESS_NAME).unlink(missing_ok=True)
        return finish_reception(self.client, self.home, signed, self.staging, final)

    @property
    def taken(self) -> int:
        """Items verified so far (read from the staging folder)."""
        return len(Progress.load(self.staging).items)

    # ------------------------------------------------------------------ parts
    def _take_parts(self, progress: Progress) -> str:
        """Take every part until the package is no longer open; its final state."""
        quiet_since = time.monotonic()
        while True:
            answer = self.client.parts(self.package_id, after=progress.parts, wait=self.wait)
            parts = answer.get("parts") or []
            for signed in parts:
                self._take_part(signed, progress)
            state = str(answer.get("state", ""))
            if state != "open":
                return state
            if parts:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= self.idle:
                raise PackageNotSealed(
                    "the sender has not sealed the package yet; what was verified so far "
                    "is kept and the rest is taken when it comes"
                )

    def _take_part(self, signed: dict[str, Any], progress: Progress) -> None:
        sender = str((signed.get("document") or {}).get("sender", ""))
        if progress.sender and sender != progress.sender:
            raise IntegrityError("a manifest part names another sender than the ones before")
        try:
            public_key = self.home.facility_public_key(self.client, sender)
            document = crypto.verify_document(signed, public_key)
            items = check_part(
                document,
                package_id=self.package_id,
                sender=sender,
                number=progress.parts + 1,
                previous=progress.chain,
            )
            if any(i.id in progress.items for i in items):
                raise IntegrityError("a manifest part lists an item an earlier part listed")
        except IntegrityError as exc:
            self._quarantine(signed, progress.parts + 1, exc)
            raise
        self._fetch(items, part=progress.parts + 1)
        progress.parts += 1
        progress.chain = part_hash(signed)
        progress.sender = sender
        progress.items.update({i.id: i.sha256 for i in items})
        progress.save(self.staging)

    def _quarantine(self, signed: dict[str, Any], number: int, exc: IntegrityError) -> None:
        """Keep a refused part for the investigation, raise a security alert (no PHI)."""
        folder = self.home.path / "failed" / f"package-{self.package_id}"
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        (folder / f"part-{number}.json").write_bytes(crypto.canonical_json(signed))
        (folder / f"part-{number}.error.txt").write_text(exc.message + "\n", "utf-8")
        log.error("part.refused", extra={"emix": {"package": self.package_id, "part": number}})
        self.home.audit(
            AuditEvent(
                event_type="security-alert",
                action=AuditAction.READ,
                outcome=AuditOutcome.SERIOUS_FAILURE,
                actor="system",
                package_id=self.package_id,
                detail=f"manifest part {number} refused, nothing of it stored: {exc.message}",
            )
        )

    # ------------------------------------------------------------------ items
    def _fetch(self, items: list[Item], part: int | None = None) -> None:
        """Download and verify items (in parallel runs), handing each run over in order."""
        if not items:
            return
        targets = {i.id: _inside(self.staging, item_relative_path(i)) for i in items}
        for path in targets.values():  # left by an attempt that stopped before its record
            path.unlink(missing_ok=True)
        advance = frames.ByteCounter(sum(i.size for i in items), None)
        runs = contiguous_runs(items)

        def fetch(run: list[Item]) -> list[Item]:
            _fetch_batch(self.client, self.package_id, run, targets, advance, part)
            return run

        with ThreadPoolExecutor(max_workers=self.parallel) as pool:
            for run in pool.map(fetch, runs):
                self._hand_over([(i, targets[i.id]) for i in run])

    def _hand_over(self, verified: list[tuple[Item, Path]]) -> None:
        if self.on_verified is None or self._handoff_pool is None:
            return
        self._handoffs.append(self._handoff_pool.submit(self._safely, verified))

    def _safely(self, verified: list[tuple[Item, Path]]) -> None:
        assert self.on_verified is not None
        try:
            self.on_verified(verified)
        except Exception:  # the destination's full delivery after the seal covers it
            log.warning("handoff.failed", exc_info=True)

    def _wait_handoffs(self) -> None:
        for future in self._handoffs:
            future.result()
        self._handoffs.clear()
