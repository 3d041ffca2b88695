"""Reading sealed packages from inside the hub, for endpoints that plugins add.

An adapter that serves package content over another protocol (DICOMweb, a viewer, a
disc image) uses :func:`open_package` and :func:`readable_packages` and never touches
the hub's tables, blobs or keys: authorization, state checks and decryption stay here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from flask import current_app
from sqlalchemy import select

from emix_core.config import HubSettings
from emix_core.content.layout import DICOM_MEDIA_TYPE
from emix_core.errors import NotFoundError
from emix_core.hub import packages as svc
from emix_core.hub.auth import client_source, current_principal, is_allowed, require
from emix_core.model import AuditEvent, Item, Package, Principal
from emix_core.store.db import PackageRow

__all__ = [
    "PackageContent",
    "audit_hub_event",
    "hub_public_url",
    "hub_settings",
    "open_package",
    "readable_packages",
]


@dataclass
class PackageContent:
    """One sealed package the caller may read, with its verified manifest.

    :param package: the package (sender, recipients, expiry).
    :param principal: the caller it was opened for.
    :param manifest: the signed manifest's document (items, studies).
    :param items: every manifest item.
    :param studies: the per-study summaries of the manifest, by Study Instance UID.
    """

    package: Package
    principal: Principal
    manifest: dict[str, Any]
    items: list[Item]
    studies: dict[str, dict[str, Any]] = field(default_factory=dict)
    _row: Any = field(default=None, repr=False)

    @property
    def id(self) -> str:
        return self.package.id

    def dicom_items(self, study: str | None = None, series: str | None = None) -> list[Item]:
        """The DICOM instances, optionally of one study and one series."""
        return [
            i
            for i in self.items
            if i.media_type == DICOM_MEDIA_TYPE
            and i.study_uid
            and i.sop_instance_uid
            and (study is None or i.study_uid == study)
            and (series is None or i.series_uid == series)
        ]

    def read_item(self, item_id: int) -> Iterator[bytes]:
        """The plaintext of one item, decrypted and authenticated segment by segment."""
        if not any(i.id == item_id for i in self.items):
            raise NotFoundError("not found")
        hub = current_app.extensions["emix"]
        return svc.read_item(hub, self._row, item_id)


def _content(row: PackageRow, package: Package, principal: Principal) -> PackageContent:
    hub = current_app.extensions["emix"]
    signed = json.loads(b"".join(svc.read_item(hub, row, svc.MANIFEST_BLOB)))
    document = signed["document"]
    items = [Item.from_dict(e) for e in document.get("items", [])]
    studies = {s["study_uid"]: s for s in document.get("studies", []) if s.get("study_uid")}
    package.items = items
    package.studies = list(studies.values())
    return PackageContent(package, principal, document, items, studies, row)


def open_package(package_id: str, action: str = "package:read") -> PackageContent:
    """Open a sealed package for the current request's caller.

    :raises NotFoundError: missing, not sealed, purged, or not readable by the caller
        (one answer for all, so nobody learns that a package exists).
    """
    hub = current_app.extensions["emix"]
    with hub.db.session() as session:
        row, package = svc.load_package(session, package_id)
    principal = require(action, package)
    if row.state != "sealed":
        raise NotFoundError("not found")
    return _content(row, package, principal)


def readable_packages(limit: int = 1000) -> Iterator[PackageContent]:
    """Every sealed, unexpired package the current caller may read, newest first, at most
    ``limit`` of them (counted among the readable ones, not among all the hub's)."""
    principal = current_principal()
    hub = current_app.extensions["emix"]
    page, offset, given = 500, 0, 0
    while given < limit:
        with hub.db.session() as session:
            ids = list(
                session.scalars(
                    select(PackageRow.id)
                    .where(PackageRow.state == "sealed")
                    .order_by(PackageRow.created.desc(), PackageRow.id)
                    .offset(offset)
                    .limit(page)
                )
            )
        for package_id in ids:
            with hub.db.session() as session:
                row, package = svc.load_package(session, package_id)
            if row.state == "sealed" and is_allowed(principal, "package:read", package):
                yield _content(row, package, principal)
                given += 1
                if given >= limit:
                    return
        if len(ids) < page:
            return
        offset += page


def hub_public_url() -> str:
    """The hub's configured public URL, without a trailing slash (for links in answers)."""
    return str(current_app.extensions["emix"].config.hub.public_url).rstrip("/")


def hub_settings() -> HubSettings:
    """The hub's settings (the ``[hub]`` table of its configuration), read-only by custom."""
    return current_app.extensions["emix"].config.hub


def audit_hub_event(event: AuditEvent) -> None:
    """Record an audit event on the hub (chain first, then forwarders)."""
    if not event.source:
        event.source = client_source()
    current_app.extensions["emix"].audit(event)
