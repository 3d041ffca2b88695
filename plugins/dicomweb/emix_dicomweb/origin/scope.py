"""What one DICOMweb request may see: one package, or every package the caller may read.

At the root (``/dicomweb``) the instances of every sealed package the caller may read are
merged; the same instance sent twice is shown once (the newest package wins). Under
``/api/v1/packages/<id>/dicomweb`` only that package is seen. Anything else is 404,
whoever asks, so nobody learns that a study exists elsewhere on the hub.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from emix_core import (
    AuditAction,
    AuditEvent,
    Item,
    NotFoundError,
    PackageContent,
    audit_hub_event,
    current_principal,
    hub_public_url,
    open_package,
    readable_packages,
)

__all__ = ["Located", "Scope"]


@dataclass
class Located:
    """One DICOM instance and the package it is read from."""

    view: PackageContent
    item: Item

    @property
    def study(self) -> str:
        return self.item.study_uid or ""

    @property
    def series(self) -> str:
        return self.item.series_uid or ""

    @property
    def sop(self) -> str:
        return self.item.sop_instance_uid or ""


class Scope:
    """The packages one request reads.

    :param package_id: one package, or ``None`` for every package the caller may read.
    """

    def __init__(self, package_id: str | None) -> None:
        self.package_id = package_id
        if package_id is None:
            self.views = list(readable_packages())
            self.base_url = f"{hub_public_url()}/dicomweb"
        else:
            self.views = [open_package(package_id)]
            self.base_url = f"{hub_public_url()}/api/v1/packages/{package_id}/dicomweb"
        seen: set[str] = set()
        self._instances: list[Located] = []
        for view in self.views:
            for item in view.dicom_items():
                if item.sop_instance_uid not in seen:
                    seen.add(item.sop_instance_uid or "")
                    self._instances.append(Located(view, item))
        # viewers show instances in this order: by Instance Number where the sender knew it
        self._instances.sort(
            key=lambda e: (e.item.instance_number is None, e.item.instance_number or 0)
        )

    def instances(
        self, study: str | None = None, series: str | None = None, sop: str | None = None
    ) -> list[Located]:
        return [
            i
            for i in self._instances
            if (study is None or i.study == study)
            and (series is None or i.series == series)
            and (sop is None or i.sop == sop)
        ]

    def found(
        self, study: str | None = None, series: str | None = None, sop: str | None = None
    ) -> list[Located]:
        """Like :meth:`instances`, but 404 when there are none."""
        located = self.instances(study, series, sop)
        if not located:
            raise NotFoundError("not found")
        return located

    def study_summary(self, study: str) -> dict[str, Any]:
        """The sender's summary of a study (from the newest package that has one)."""
        for view in self.views:
            if study in view.studies:
                return view.studies[study]
        return {}

    def series_summary(self, study: str, series: str) -> dict[str, Any] | None:
        for detail in self.study_summary(study).get("series_details") or []:
            if detail.get("series_uid") == series:
                return detail
        return None

    def url(self, study: str, series: str | None = None, sop: str | None = None) -> str:
        url = f"{self.base_url}/studies/{study}"
        if series:
            url += f"/series/{series}"
        if sop:
            url += f"/instances/{sop}"
        return url

    def audit(self, event_type: str, located: list[Located], detail: str) -> None:
        """One audit event per package read: a query (E) or a transfer (R)."""
        action = AuditAction.READ if event_type == "instances-transferred" else AuditAction.EXECUTE
        by_package: dict[str, tuple[PackageContent, set[str]]] = {}
        for entry in located:
            by_package.setdefault(entry.view.id, (entry.view, set()))[1].add(entry.study)
        if not by_package and self.package_id is not None:
            by_package[self.package_id] = (self.views[0], set())
        if not by_package:  # a search at the root that found nothing is audited too
            audit_hub_event(
                AuditEvent(
                    event_type=event_type,
                    action=action,
                    actor=current_principal().email,
                    detail=detail,
                )
            )
        for view, studies in by_package.values():
            audit_hub_event(
                AuditEvent(
                    event_type=event_type,
                    action=action,
                    actor=view.principal.email,
                    package_id=view.id,
                    phi={"studies": sorted(studies)},
                    detail=detail,
                )
            )
