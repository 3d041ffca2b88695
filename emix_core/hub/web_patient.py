"""Patient access: one study, shared with a patient's mail address plus a code given in person.

The sender's member shares a study of a package it sent: the patient gets a link by
mail (no PHI) and the access code on paper. Both are needed; the code is throttled per
share; the session sees that one study only, until the share expires. Every access is
audited.
"""

from __future__ import annotations

import hmac
import secrets
from datetime import timedelta
from typing import Any

import zipstream
from flask import Blueprint, Response, g, redirect, request, stream_with_context
from sqlalchemy import select

from emix_core.content.layout import item_relative_path
from emix_core.errors import NotFoundError
from emix_core.hub import sessions as web_sessions
from emix_core.hub import thumbnails
from emix_core.hub.api_facilities import EMAIL_RE
from emix_core.hub.auth import audit_request, client_source, hash_secret
from emix_core.hub.reader import PackageContent, open_package
from emix_core.hub.web import (
    _mail,
    check_csrf,
    current_web_session,
    hub,
    member_required,
    message,
    render_page,
    start_session,
)
from emix_core.hub.web_packages import series_rows, study_rows
from emix_core.model import AuditAction, AuditEvent, utcnow
from emix_core.store.db import PackageRow, PatientShare

bp = Blueprint("web_patient", __name__)

CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
MAX_DAYS = 30


def new_access_code() -> str:
    """12 characters (60 bits) in 3 groups, without look-alike letters: ``K7QX-M2PD-9TRA``."""
    raw = "".join(secrets.choice(CODE_ALPHABET) for _ in range(12))
    return "-".join(raw[i : i + 4] for i in range(0, 12, 4))


def _code_hash(share_token_hash: str, code: str) -> str:
    cleaned = "".join(c for c in code.upper() if c.isalnum())
    return hash_secret(f"{share_token_hash}:{cleaned}")


# --------------------------------------------------------------------------- the sender


def _sent_package(package_id: str) -> tuple[Any, PackageContent]:
    principal = member_required()
    content = open_package(package_id, action="package:status")
    if content.package.sender != principal.facility:
        raise NotFoundError("not found")
    return principal, content


@bp.get("/packages/<package_id>/share")
def share_form(package_id: str) -> Response:
    _principal, content = _sent_package(package_id)
    return render_page("share.html", package=content.package, studies=study_rows(content))


@bp.post("/packages/<package_id>/share")
def share(package_id: str) -> Response:
    principal, content = _sent_package(package_id)
    check_csrf()
    email = request.form.get("email", "").strip().lower()[:254]
    study = request.form.get("study", "")
    days = request.form.get("days", 14, type=int) or 14
    if not EMAIL_RE.match(email) or study not in content.studies or not 1 <= days <= MAX_DAYS:
        return message(
            "Check the form",
            f"Choose a study, give the patient's email address and 1 to {MAX_DAYS} days.",
            status=400,
        )
    h = hub()
    token = secrets.token_urlsafe(32)
    code = new_access_code()
    expires = utcnow() + timedelta(days=days)
    if content.package.expires is not None:
        expires = min(expires, web_sessions.aware(content.package.expires))
    with h.db.session() as session:
        token_hash = hash_secret(token)
        session.add(
            PatientShare(
                package_id=content.id,
                study_uid=study,
                email=email,
                code_hash=_code_hash(token_hash, code),
                token_hash=token_hash,
                created_by=principal.member_id,
                expires=expires,
            )
        )
    _mail(
        email,
        "Your medical images are ready on emix",
        "Your care provider shared medical images with you through emix.\n\n"
        f"Open them here: {h.config.hub.public_url.rstrip('/')}/patient/{token}\n\n"
        "You also need the access code you were given in person or on paper.\n"
        f"The link works until {expires:%Y-%m-%d} (UTC).\n"
        "For your privacy this message contains no medical information.\n",
    )
    audit_request(
        "export",
        action=AuditAction.READ,
        actor=principal.email,
        detail=f"study shared with a patient for {days} days",
        package_id=content.id,
        phi={"studies": [study], "patient_email": email},
    )
    return render_page("shared.html", code=code, email=email, expires=expires)


# --------------------------------------------------------------------------- the patient


def _share_by_token(session: Any, token: str) -> PatientShare | None:
    if not token or len(token) > 100:
        return None
    share = session.scalar(
        select(PatientShare).where(PatientShare.token_hash == hash_secret(token))
    )
    if share is None or share.revoked_at is not None:
        return None
    return share if web_sessions.aware(share.expires) > utcnow() else None


@bp.get("/patient")
def patient_start() -> Response:
    return message(
        "Open the link in your email",
        "Your care provider mailed you a link to your images. Open it and type the access "
        "code you were given.",
    )


@bp.get("/patient/<token>")
def patient_link(token: str) -> Response:
    with hub().db.session() as session:
        share = _share_by_token(session, token)
    if share is None:
        return message("This link has expired", "Ask your care provider to share again.", 404)
    return render_page("patient_code.html", token=token)


@bp.post("/patient/<token>")
def patient_code(token: str) -> Any:
    check_csrf()
    h = hub()
    source = client_source()
    with h.db.session() as session:
        share = _share_by_token(session, token)
        if share is None:
            return message("This link has expired", "Ask your care provider to share again.", 404)
        key = f"patient:{share.id}"
        if web_sessions.throttled(session, key):
            return message(
                "Please wait", "Too many wrong codes. Try again in 15 minutes.", status=429
            )
        sent = request.form.get("code", "")[:40]
        ok = hmac.compare_digest(share.code_hash, _code_hash(share.token_hash, sent))
        share_id, package_id, study = share.id, share.package_id, share.study_uid
    if not ok:
        web_sessions.record_failure(h, key, source, "wrong patient access code")
        return render_page(
            "patient_code.html",
            status=400,
            token=token,
            error="That code is not right. Check the paper you were given and try again.",
        )
    _audit_patient(share_id, package_id, study, "patient signed in with an access code")
    return start_session(redirect("/patient/study", code=303), patient_share_id=share_id)


def _audit_patient(share_id: int, package_id: str, study: str, detail: str) -> None:
    hub().audit(
        AuditEvent(
            event_type="instances-accessed",
            action=AuditAction.READ,
            actor=f"patient-share-{share_id}",
            source=client_source(),
            package_id=package_id,
            phi={"studies": [study]},
            detail=detail,
        )
    )


def _patient_content() -> tuple[PatientShare, PackageContent]:
    """The shared study of this browser's patient session (the sign-in page otherwise)."""
    ws = current_web_session()
    share = None
    if ws is not None and ws.patient_share_id is not None:
        with hub().db.session() as session:
            share = session.get(PatientShare, ws.patient_share_id)
            row = session.get(PackageRow, share.package_id) if share else None
    if (
        share is None
        or share.revoked_at is not None
        or web_sessions.aware(share.expires) < utcnow()
        or row is None
        or row.state != "sealed"
    ):
        raise NotFoundError("your access has ended; ask your care provider to share again")
    # read the package as the member who shared it, narrowed to the one study below
    with hub().db.session() as session:
        g.principal = web_sessions.principal_for(session, share.created_by)
    content = open_package(share.package_id, action="package:status")
    content.studies = {share.study_uid: content.studies.get(share.study_uid, {})}
    content.items = content.dicom_items(share.study_uid)
    return share, content


@bp.get("/patient/study")
def patient_study() -> Response:
    share, content = _patient_content()
    _audit_patient(share.id, content.id, share.study_uid, "patient viewed the study page")
    return render_page(
        "patient_study.html",
        patient="Patient access",
        studies=study_rows(content),
        series=series_rows(content),
        expires=web_sessions.aware(share.expires),
        size=sum(i.size for i in content.items),
    )


@bp.get("/patient/study/preview/<int:item_id>.png")
def patient_preview(item_id: int) -> Response:
    _share, content = _patient_content()
    if not any(i.id == item_id for i in content.items):
        raise NotFoundError("not found")
    return Response(
        thumbnails.thumbnail(b"".join(content.read_item(item_id))), mimetype="image/png"
    )


@bp.get("/patient/study/download.zip")
def patient_zip() -> Response:
    share, content = _patient_content()
    archive = zipstream.ZipStream(compress_type=zipstream.ZIP_STORED, sized=True)
    for item in content.items:
        archive.add(_lazy(content, item.id), item_relative_path(item), size=item.size)
    _audit_patient(share.id, content.id, share.study_uid, "patient downloaded the study")
    response = Response(stream_with_context(archive), mimetype="application/zip")
    response.headers["Content-Length"] = str(len(archive))
    response.headers["Content-Disposition"] = 'attachment; filename="my-images.zip"'
    return response


def _lazy(content: PackageContent, item_id: int) -> Any:
    yield from content.read_item(item_id)
