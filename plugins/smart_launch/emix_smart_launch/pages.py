"""The SMART app's pages for the patient in context: received studies and the EMR's
resources, the viewer opened in a new tab, a report saved to the chart."""

from __future__ import annotations

import hmac
import secrets
import time
from datetime import timedelta
from typing import Any

from flask import g, redirect, request
from werkzeug.wrappers import Response

from emix_core import (
    AuditAction,
    AuditEvent,
    EmixError,
    LaunchRejected,
    audit_hub_event,
    member_principal,
    open_package,
    render_page,
    sign_in_member,
    viewer_url,
)

from . import context as store
from . import fhir, oauth, writeback
from .settings import load_settings
from .views import CONTEXT_COOKIE, FHIR_ID, _notice, _refused, _settings, bp, oauth_expiry

#: Refresh the access token when it has less than this left, seconds.
REFRESH_MARGIN = 30
#: A link from the EMR's emix page to the viewer works once, for this long.
OPEN_TTL = timedelta(minutes=2)


# --------------------------------------------------------------------------- the patient


def _live_context() -> tuple[dict[str, Any], fhir.FhirReader]:
    """This browser's launch, its member as the request's principal, a FHIR reader with a
    fresh access token (refreshed when about to expire)."""
    handle = request.cookies.get(CONTEXT_COOKIE, "")
    loaded = store.load_context(handle)
    if loaded is None:
        raise LaunchRejected("no EMR session is open here; open emix from a patient's chart")
    context, tokens = loaded
    principal = member_principal(int(context["member_id"]))
    if principal is None:
        store.end_context(handle)
        raise LaunchRejected("your emix membership has ended; ask your facility's administrator")
    g.principal = principal
    if store.expires_at(tokens) < time.time() + REFRESH_MARGIN:
        if not tokens.get("refresh_token"):
            store.end_context(handle)
            raise LaunchRejected("your EMR session ended; open emix from the chart again")
        settings = _settings()
        server = oauth.discover(context["iss"])
        fresh = oauth.refresh(settings, server, tokens["refresh_token"])
        tokens = {
            "access_token": fresh["access_token"],
            "refresh_token": fresh.get("refresh_token") or tokens["refresh_token"],
            "expires_at": oauth_expiry(fresh),
        }
        store.save_context(context, tokens, handle)
    return context, fhir.FhirReader(context["iss"], tokens["access_token"])


@bp.get("/")
def patient_page() -> Response:
    try:
        context, reader = _live_context()
        patient = fhir.patient_summary(reader.read(f"Patient/{context['patient']}"))
        imaging = fhir.imaging_rows(reader.search("ImagingStudy", context["patient"]))
        reports = fhir.report_rows(reader.search("DiagnosticReport", context["patient"]))
        received = fhir.received_for(patient)
    except EmixError as exc:
        return _refused(exc)
    principal = g.principal
    for row in received:
        if viewer_url(row["package"], row["study_uid"]):
            row["viewer"] = f"/smart/open/{_open_ticket(principal.member_id, row)}"
    audit_hub_event(
        AuditEvent(
            event_type="query",
            action=AuditAction.READ,
            actor=principal.email,
            phi={"patient": context["patient"], "studies": [r["study_uid"] for r in received]},
            detail=f"SMART patient view: {len(received)} received studies, {len(imaging)} "
            f"imaging studies and {len(reports)} reports from the EMR",
        )
    )
    granted = str(context.get("scope", "")).split()
    may_write = load_settings().write_back and any(
        s.startswith("patient/DocumentReference.") and s.endswith((".c", ".write", ".cruds"))
        for s in granted
    )
    return render_page(
        "smart_patient.html",
        principal=principal,
        write_back=may_write,
        smart_csrf=context.get("csrf", ""),
        patient_view=patient,
        received=received,
        imaging=imaging,
        reports=reports,
    )


def _open_ticket(member_id: int, row: dict[str, Any]) -> str:
    """A single-use link (2 minutes) that opens a study in the viewer in a new tab.

    The viewer reads with the hub's session cookie; in an EMR iframe on another site that
    cookie is the iframe's (partitioned, or not kept at all), so the new tab signs the
    member in first-party with this ticket, like a mailed sign-in link.
    """
    ticket = secrets.token_urlsafe(32)
    store.records().put(
        f"open:{ticket}",
        {"member_id": member_id, "package": row["package"], "study": row["study_uid"]},
        OPEN_TTL,
    )
    return ticket


@bp.get("/open/<ticket>")
def open_in_viewer(ticket: str) -> Response:
    opened = store.records().take(f"open:{ticket[:100]}")
    target = viewer_url(opened["package"], opened["study"]) if opened else None
    if opened is None or target is None:
        return _notice(
            "This link was already used",
            "Links to the viewer work once, for two minutes.",
            404,
            "Go back to the EMR's emix page and click Open in viewer again.",
        )
    response = redirect(target, code=303)
    return sign_in_member(response, int(opened["member_id"]), detail="viewer opened from the EMR")


@bp.post("/reports/<package_id>/<int:item_id>")
def save_report(package_id: str, item_id: int) -> Response:
    """Write a received report to the patient's chart as a DocumentReference."""
    try:
        context, reader = _live_context()
        sent = request.form.get("csrf", "")
        if not sent or not hmac.compare_digest(sent, str(context.get("csrf", ""))):
            raise LaunchRejected("the form expired; reload the page and try again")
        if not load_settings().write_back:
            raise LaunchRejected("saving reports to the chart is off on this hub")
        patient = fhir.patient_summary(reader.read(f"Patient/{context['patient']}"))
        rows = [
            r
            for r in fhir.received_for(patient)
            if r["package"] == package_id and any(i["item"] == item_id for i in r["reports"])
        ]
        if not rows:  # only this patient's reports go into this patient's chart
            raise LaunchRejected("this report is not of the patient in the chart")
        content = open_package(package_id)
        item, data = writeback.read_report(content, item_id)
        resource = writeback.document_reference(
            context["patient"], content, item, data, [r["study_uid"] for r in rows]
        )
        created = reader.create(resource)
    except EmixError as exc:
        return _refused(exc, getattr(g.get("principal"), "email", "unknown"))
    audit_hub_event(
        AuditEvent(
            event_type="export",
            action=AuditAction.CREATE,
            actor=g.principal.email,
            package_id=package_id,
            phi={"patient": context["patient"], "document": created},
            detail="report saved to the EMR's chart as a DocumentReference",
        )
    )
    return _notice(
        "Saved to the chart",
        "The report is in the patient's chart in the EMR as a document.",
        201,
        "Go back to the patient's emix page to open the images.",
    )


@bp.get("/study/<study_id>")
def study(study_id: str) -> Response:
    """The EMR launched emix for one ImagingStudy: its received copy in the viewer."""
    try:
        if not FHIR_ID.fullmatch(study_id):
            raise LaunchRejected("not a FHIR resource id")
        context, reader = _live_context()
        imaging = reader.read(f"ImagingStudy/{study_id}")
        subject = str((imaging.get("subject") or {}).get("reference") or "")
        if subject != f"Patient/{context['patient']}":
            raise LaunchRejected("the EMR's study is not of the patient in context")
        uid = fhir.study_uid_of(imaging)
        patient = fhir.patient_summary(reader.read(f"Patient/{context['patient']}"))
        match = [r for r in fhir.received_for(patient) if uid and r["study_uid"] == uid]
    except EmixError as exc:
        return _refused(exc)
    target = viewer_url(match[0]["package"], uid) if match else None
    return redirect(target or "/smart/", code=303)
