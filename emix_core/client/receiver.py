"""The receiving side: fetch a package, verify signature and every hash, write atomically.

Files land in a hidden staging folder next to the destination and are renamed into
place only when every item verified, so a recipient never sees half a package; an
existing package folder is never overwritten. A signed receipt then tells the sender
what arrived.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emix_core import crypto, frames
from emix_core.client.home import LocalHome
from emix_core.client.hub import HubClient
from emix_core.content.layout import DICOM_MEDIA_TYPE, item_relative_path
from emix_core.content.manifest_rules import check_document
from emix_core.errors import ConflictError, EmixError, IntegrityError, UnsafePathError
from emix_core.model import AuditAction, AuditEvent, AuditOutcome, Item, Package, Recipient, utcnow
from emix_core.plugins import hooks_for
from emix_core.reports.convert import context_from_studies, deliver_in_preferred_format

log = logging.getLogger("emix.receive")

RECEIPT_FORMAT = "emix-receipt/1"
MANIFEST_NAME = "emix-manifest.json"


@dataclass
class ReceivedPackage:
    """A package written and verified on the receiving side."""

    package_id: str
    path: Path
    sender: str
    items: list[tuple[Item, Path]] = field(default_factory=list)
    studies: list[dict[str, Any]] = field(default_factory=list)
    #: reports converted into the recipient's preferred format (originals kept beside)
    converted: list[Path] = field(default_factory=list)

    @property
    def package(self) -> Package:
        return Package(
            id=self.package_id,
            sender=self.sender,
            items=[i for i, _ in self.items],
            state="delivered",
            studies=self.studies,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "package": self.package_id,
            "path": str(self.path),
            "from": self.sender,
            "items": len(self.items),
            "bytes": sum(i.size for i, _ in self.items),
            "converted": [str(p) for p in self.converted],
        }


def verified_manifest(client: HubClient, home: LocalHome, package_id: str) -> dict[str, Any]:
    """The package's manifest, its signature checked against the sender's pinned key."""
    signed = client.manifest(package_id)
    sender = signed.get("document", {}).get("sender", "")
    public_key = home.facility_public_key(client, sender)
    document = crypto.verify_document(signed, public_key)
    if document.get("package") != package_id:
        raise IntegrityError("the manifest belongs to another package")
    return signed


def _inside(root: Path, relative: str) -> Path:
    target = (root / relative).resolve()
    if not target.is_relative_to(root.resolve()):
        raise UnsafePathError("an item path would leave the package folder")
    return target


def _fetch_batch(
    client: HubClient,
    package_id: str,
    batch: list[Item],
    targets: dict[int, Path],
    progress: Callable[[int], None],
    part: int | None = None,
) -> None:
    """Fetch a run of items in one request; check each against the signed manifest (or
    against manifest part ``part``, which lists them, before the seal)."""
    expected = {item.id: item for item in batch}
    handles = []

    def open_target(header: frames.FrameHeader):  # type: ignore[no-untyped-def]
        if header.id not in expected:
            raise IntegrityError("the hub sent an item the manifest does not list")
        target = targets[header.id]
        target.parent.mkdir(parents=True, exist_ok=True)
        handle = open(target, "xb")  # noqa: SIM115 - closed below, after fsync
        handles.append(handle)
        return handle

    try:
        if part is None:
            digests = client.download_batch(
                package_id, batch[0].id, batch[-1].id, open_target, progress
            )
        else:
            digests = client.download_batch(
                package_id, batch[0].id, batch[-1].id, open_target, progress, part=part
            )
        for handle in handles:
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        for handle in handles:
            handle.close()
    for item in batch:
        if digests.get(item.id) != item.sha256 or targets[item.id].stat().st_size != item.size:
            raise IntegrityError(
                f"item {item.id} does not match the signed manifest (tampered or corrupted); "
                "nothing was kept, ask the sender to send again"
            )


def _reports_in_preferred_format(
    home: LocalHome,
    targets: list[tuple[Item, Path]],
    studies: list[dict[str, Any]],
    preferred: str,
    facility: str = "",
) -> list[Path]:
    """Write each report's copy in the recipient's format beside the original.

    A report that cannot be converted is kept as it came (never lost) and logged.
    """
    if not preferred:
        return []
    from emix_core.reports.identity import oid_for_facility

    oid = home.config.identifiers.facility_oid or oid_for_facility(facility)
    context = context_from_studies(studies, facility_oid=oid)
    converted = []
    for item, path in targets:
        if item.media_type == DICOM_MEDIA_TYPE:
            continue
        try:
            copy = deliver_in_preferred_format(home.pm, path, preferred, context=context)
        except EmixError as exc:
            log.warning(
                "item %s kept as sent; not converted to %s: %s", item.id, preferred, exc.message
            )
            continue
        if copy is not None:
            converted.append(copy)
    return converted


def _index_for_viewers(staging: Path, targets: list[tuple[Item, Path]]) -> None:
    """Write the DICOMDIR a viewer opens the folder by; a failure never stops a reception."""
    from emix_core.content.dicomdir import write_received_dicomdir

    try:
        result = write_received_dicomdir(staging, targets)
    except Exception as exc:  # the index is a convenience: the package is complete without it
        log.warning("dicomdir.not_written", extra={"emix": {"reason": type(exc).__name__}})
        return
    if result.left_out:
        log.warning("dicomdir.incomplete", extra={"emix": {"left_out": result.left_out}})


def receive_package(
    package_id: str,
    out_dir: Path,
    *,
    client: HubClient,
    home: LocalHome,
    parallel: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> ReceivedPackage:
    """Download, verify and write a package to ``out_dir/<package-id>/``, then post a receipt.

    :raises IntegrityError: signature, size or hash mismatch (nothing is left behind).
    :raises ConflictError: the destination folder exists already (never overwritten).
    """
    out_dir = Path(out_dir).resolve()  # item paths are checked resolved; so is the root
    signed = verified_manifest(client, home, package_id)
    document = signed["document"]
    items = check_document(document)  # a crafted manifest is refused before any path
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / package_id
    if final.exists():
        raise ConflictError(f"{final} exists already; emix never overwrites a received package")
    staging = out_dir / f".{package_id}.partial-{secrets.token_hex(4)}"
    staging.mkdir(mode=0o700)
    try:
        paths = {item.id: _inside(staging, item_relative_path(item)) for item in items}
        advance = frames.ByteCounter(sum(i.size for i in items), progress)

        with ThreadPoolExecutor(max_workers=max(parallel, 1)) as pool:
            jobs = [
                pool.submit(_fetch_batch, client, package_id, batch, paths, advance)
                for batch in frames.batches(sorted(items, key=lambda i: i.id))
            ]
            for job in jobs:
                job.result()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return finish_reception(client, home, signed, staging, final)


def finish_reception(
    client: HubClient, home: LocalHome, signed: dict[str, Any], staging: Path, final: Path
) -> ReceivedPackage:
    """Complete a reception whose every item is verified in ``staging``: index it, move it
    to ``final`` in one rename, post the signed receipt, audit, tell the plugins.

    ``staging`` is removed if this fails before the rename.
    """
    document = signed["document"]
    package_id = document["package"]
    items = check_document(document)
    me = client.me()
    try:
        targets = [(item, _inside(staging, item_relative_path(item))) for item in items]
        (staging / MANIFEST_NAME).write_bytes(crypto.canonical_json(signed))
        converted = _reports_in_preferred_format(
            home,
            targets,
            document.get("studies", []),
            me.get("report_format", ""),
            str(me.get("facility") or ""),
        )
        _index_for_viewers(staging, targets)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    received = ReceivedPackage(
        package_id,
        final,
        document["sender"],
        [(item, final / path.relative_to(staging)) for item, path in targets],
        document.get("studies", []),
        [final / path.relative_to(staging) for path in converted],
    )
    home.register_key(client)
    receipt = {
        "format": RECEIPT_FORMAT,
        "package": package_id,
        "recipient": me["facility"],
        "member": me["email"],
        "received": utcnow().isoformat(),
        "items": [{"id": i.id, "sha256": i.sha256} for i in items],
    }
    client.post_receipt(package_id, crypto.sign_document(home.signing_key, receipt))
    home.audit(
        AuditEvent(
            event_type="instances-transferred",
            action=AuditAction.CREATE,
            outcome=AuditOutcome.SUCCESS,
            actor=me["email"],
            package_id=package_id,
            phi={"studies": [s.get("study_uid") for s in received.studies]},
            detail=f"received {len(items)} items from {received.sender}",
        )
    )
    package = received.package
    package.recipients = [Recipient(me["facility"])]
    hooks_for(home.pm).package_received(package, str(final))
    return received
