"""Pages of a signed-in recipient: the inbox, a package, its previews, report and downloads."""

from __future__ import annotations

import io
from collections import OrderedDict
from itertools import islice
from typing import Any

import pydicom
from flask import Blueprint, Response, url_for
from sqlalchemy import select

from emix_core.content.documents import REPORT_MEDIA_TYPES
from emix_core.errors import EmixError, NotFoundError
from emix_core.hub import api_packages, disc_image, pacs_push, thumbnails
from emix_core.hub.auth import audit_request
from emix_core.hub.pacs_network import parse_networks
from emix_core.hub.reader import PackageContent, open_package, readable_packages
from emix_core.hub.viewer import viewer_url
from emix_core.hub.web import check_csrf, hub, member_required, message, render_page
from emix_core.model import AuditAction, AuditOutcome, Item, utcnow
from emix_core.plugins import hooks_for
from emix_core.store.db import Facility, PackageRow

bp = Blueprint("web_packages", __name__)


def person_name(value: str | None) -> str:
    """``MUSTERMANN^ERIKA`` → ``Mustermann, Erika``."""
    if not value:
        return "—"
    parts = [p.strip().title() for p in str(value).split("^") if p.strip()]
    return ", ".join(parts[:2]) + (" " + " ".join(parts[2:]) if len(parts) > 2 else "")


def dicom_date(value: str | None) -> str:
    """``20240131`` → ``2024-01-31``."""
    if value and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value or "—"


def study_rows(content: PackageContent) -> list[dict[str, Any]]:
    rows = []
    for uid, summary in content.studies.items():
        rows.append(
            {
                "uid": uid,
                "patient": person_name(summary.get("patient_name")),
                "patient_id": summary.get("patient_id") or "",
                "date": dicom_date(summary.get("study_date")),
                "modalities": ", ".join(summary.get("modalities") or []) or "—",
                "description": summary.get("study_description") or "(no description)",
                "accession": summary.get("accession_number") or "",
                "series_count": summary.get("series") or 0,
                "instances": summary.get("instances") or 0,
            }
        )
    return rows


@bp.get("/inbox")
def inbox() -> Response:
    principal = member_required()
    now = utcnow()
    packages = []
    for content in readable_packages(limit=200):
        expires = content.package.expires
        if expires is not None and expires.tzinfo is None:
            expires = expires.replace(tzinfo=now.tzinfo)
        if expires is not None and expires < now:
            continue
        studies = study_rows(content)
        packages.append(
            {
                "id": content.id,
                "sender": content.package.sender,
                "expires": expires,
                "days_left": max((expires - now).days, 0) if expires else None,
                "studies": studies,
                "size": sum(i.size for i in content.items),
            }
        )
    sent = sent_packages(principal)
    audit_request(
        "query",
        action=AuditAction.EXECUTE,
        actor=principal.email,
        detail=f"web inbox listed ({len(packages)} packages)",
    )
    return render_page("inbox.html", packages=packages, sent=sent)


def sent_packages(principal: Any, limit: int = 50) -> list[dict[str, Any]]:
    """Unexpired packages the member's facility sent (to share a study with its patient)."""
    with hub().db.session() as session:
        ids = list(
            session.scalars(
                select(PackageRow.id)
                .join(Facility, Facility.id == PackageRow.sender_facility_id)
                .where(
                    Facility.address == principal.facility,
                    PackageRow.state == "sealed",
                    PackageRow.expires > utcnow(),
                )
                .order_by(PackageRow.sealed_at.desc())
                .limit(limit)
            )
        )
    out = []
    for package_id in ids:
        content = open_package(package_id, action="package:status")
        out.append(
            {
                "id": content.id,
                "to": ", ".join(str(r) for r in content.package.recipients),
                "studies": study_rows(content),
            }
        )
    return out


def _header(content: PackageContent, item: Item) -> Any:
    """The DICOM header of an instance (decrypting only its first segments)."""
    head = b"".join(islice(content.read_item(item.id), 4))
    try:
        return pydicom.dcmread(io.BytesIO(head), stop_before_pixels=True, force=True)
    except Exception:
        return None


def series_rows(content: PackageContent) -> list[dict[str, Any]]:
    groups: OrderedDict[tuple[str, str], list[Item]] = OrderedDict()
    for item in content.dicom_items():
        groups.setdefault((item.study_uid or "", item.series_uid or ""), []).append(item)
    rows = []
    for (study, _series), items in groups.items():
        ds = _header(content, items[0])
        rows.append(
            {
                "study": study,
                "number": str(getattr(ds, "SeriesNumber", "") or "") if ds else "",
                "modality": str(getattr(ds, "Modality", "") or "") if ds else "",
                "description": str(getattr(ds, "SeriesDescription", "") or "") if ds else "",
                "count": len(items),
                "preview_item": items[len(items) // 2].id,
            }
        )
    rows.sort(
        key=lambda r: (
            str(r["study"]),
            int(str(r["number"]) or 0) if str(r["number"]).isdigit() else 0,
        )
    )
    return rows


def report_views(content: PackageContent) -> list[dict[str, Any]]:
    hooks = hooks_for(hub().pm)
    views = []
    for item in content.items:
        if item.media_type not in REPORT_MEDIA_TYPES:
            continue
        data = b"".join(content.read_item(item.id))
        try:
            report = hooks.parse_report(data, item.media_type)
        except Exception:
            report = None
        text = pdf_text(data) if report is None and item.media_type == "application/pdf" else ""
        views.append({"item": item, "report": report, "text": text})
    return views


def pdf_text(data: bytes, pages: int = 10) -> str:
    """The text of a PDF report's first pages, for reading it on the page."""
    try:
        from pypdf import PdfReader

        reader = PdfReader(io.BytesIO(data))
        return "\n\n".join((page.extract_text() or "").strip() for page in reader.pages[:pages])
    except Exception:
        return ""


@bp.get("/packages/<package_id>")
def package_page(package_id: str) -> Response:
    principal = member_required()
    content = open_package(package_id)
    studies = study_rows(content)
    series = series_rows(content)
    reports = report_views(content)
    with hub().db.session() as session:
        pacs = pacs_push.destination_of(session, principal.facility)
        pacs_name = pacs.name if pacs else None
    audit_request(
        "instances-accessed",
        action=AuditAction.READ,
        actor=principal.email,
        detail="package page viewed",
        package_id=content.id,
        phi={"studies": sorted(content.studies)},
    )
    return render_page(
        "package.html",
        package=content.package,
        studies=studies,
        series=series,
        reports=reports,
        size=sum(i.size for i in content.items),
        viewer=viewer_url,
        iso=disc_image.available(),
        pacs=pacs_name,
        documents=[i for i in content.items if i.media_type not in ("application/dicom",)],
    )


@bp.get("/packages/<package_id>/preview/<int:item_id>.png")
def preview(package_id: str, item_id: int) -> Response:
    member_required()
    content = open_package(package_id)
    if not any(i.id == item_id for i in content.dicom_items()):
        raise NotFoundError("not found")
    data = b"".join(content.read_item(item_id))
    response = Response(thumbnails.thumbnail(data), mimetype="image/png")
    response.headers["Cache-Control"] = "private, max-age=3600"
    return response


@bp.get("/packages/<package_id>/documents/<int:item_id>")
def document(package_id: str, item_id: int) -> Response:
    principal = member_required()
    content = open_package(package_id)
    item = next((i for i in content.items if i.id == item_id), None)
    if item is None or item.media_type == "application/dicom":
        raise NotFoundError("not found")
    audit_request(
        "instances-transferred",
        action=AuditAction.READ,
        actor=principal.email,
        detail="document downloaded",
        package_id=content.id,
    )
    extension = {"application/pdf": "pdf", "text/plain": "txt"}.get(item.media_type, "bin")
    response = Response(b"".join(content.read_item(item.id)), mimetype=item.media_type)
    response.headers["Content-Disposition"] = f'attachment; filename="report-{item.id}.{extension}"'
    return response


@bp.get("/packages/<package_id>/download.zip")
def download_zip(package_id: str) -> Response:
    member_required()
    return api_packages.download_zip(package_id)


@bp.get("/packages/<package_id>/download.iso")
def download_iso(package_id: str) -> Response:
    principal = member_required()
    content = open_package(package_id)
    response = disc_image.response(content)
    audit_request(
        "instances-transferred",
        action=AuditAction.READ,
        actor=principal.email,
        detail=f"CD image of {len(content.items)} items downloaded",
        package_id=content.id,
    )
    return response


@bp.post("/packages/<package_id>/push")
def push_to_pacs(package_id: str) -> Response:
    """Send the package's instances into the facility's own PACS (STOW-RS or C-STORE)."""
    principal = member_required()
    check_csrf()
    content = open_package(package_id)
    with hub().db.session() as session:
        pacs = pacs_push.destination_of(session, principal.facility)
        target = (pacs.name, pacs.url) if pacs else None
    if target is None:
        raise NotFoundError("your facility has no PACS destination; ask its administrator")
    try:
        networks = parse_networks(hub().config.hub.pacs_networks)
        result = pacs_push.push_to(content, target[1], hooks_for(hub().pm), networks)
    except EmixError as exc:
        result = pacs_push.PushResult(failed=len(list(content.dicom_items())), errors=[exc.message])
    audit_request(
        "export",
        action=AuditAction.READ,
        actor=principal.email,
        detail=f"pushed to PACS {target[0]}: {result.stored} stored, {result.failed} failed",
        package_id=content.id,
        phi={"studies": sorted(content.studies)},
        outcome=AuditOutcome.SUCCESS if not result.failed else AuditOutcome.MINOR_FAILURE,
    )
    if result.failed:
        text = (
            f"{result.stored} images were stored in {target[0]}, {result.failed} were not: "
            + "; ".join(result.errors)
            + ". Try again, or ask your PACS administrator."
        )
        return message("Not everything was sent", text, status=502)
    return message("Sent to your PACS", f"All {result.stored} images were stored in {target[0]}.")


def package_url(package_id: str) -> str:
    return url_for("web_packages.package_page", package_id=package_id)
