"""Retention: expired packages are purged and their data keys destroyed (crypto-shredding).

The audit trail is kept (six years); packages under legal hold are skipped.
"""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import select

from emix_core.hub.context import Hub
from emix_core.model import AuditAction, AuditEvent, AuditOutcome, utcnow
from emix_core.store.db import PackageRow

log = logging.getLogger("emix.retention")


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=utcnow().tzinfo)


def purge_expired(hub: Hub, now: datetime | None = None) -> dict[str, list[str]]:
    """Delete the blobs and destroy the keys of every expired package (not on hold).

    Also drops open packages that were never sealed within their retention period.
    :return: ``{"purged": [...ids], "held": [...ids]}``.
    """
    with hub.db.leader("retention", hub.config.home) as leading:
        if not leading:
            log.info("retention purge already running on another instance; skipped")
            return {"purged": [], "held": []}
        return _purge(hub, now or utcnow())


def _purge(hub: Hub, now: datetime) -> dict[str, list[str]]:
    purged: list[str] = []
    held: list[str] = []
    with hub.db.session() as session:
        rows = session.scalars(
            select(PackageRow).where(PackageRow.state.in_(("open", "sealed")))
        ).all()
        candidates = [(r.id, r.legal_hold) for r in rows if _aware(r.expires) <= now]
    for package_id, legal_hold in candidates:
        if legal_hold:
            held.append(package_id)
            continue
        hub.blobs.delete_prefix(package_id)
        with hub.db.session() as session:
            row = session.get(PackageRow, package_id)
            if row is None:
                continue
            row.wrapped_key = None
            row.summary = None
            row.state = "purged"
            row.purged_at = now
        hub.audit(
            AuditEvent(
                event_type="study-deleted",
                action=AuditAction.DELETE,
                outcome=AuditOutcome.SUCCESS,
                actor="retention",
                source="local",
                package_id=package_id,
                detail="package expired: blobs deleted, data key destroyed",
            )
        )
        purged.append(package_id)
    if purged:
        hub.db.checkpoint()
    return {"purged": purged, "held": held}


def set_legal_hold(hub: Hub, package_id: str, hold: bool) -> None:
    with hub.db.session() as session:
        row = session.get(PackageRow, package_id)
        if row is None:
            from emix_core.errors import NotFoundError

            raise NotFoundError("no such package")
        row.legal_hold = hold
    hub.audit_operator(
        AuditAction.UPDATE, f"legal hold {'set' if hold else 'released'}", package_id=package_id
    )
