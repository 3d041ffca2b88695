""" "Share with…": a clinician asks, from the chart, that a study of the facility's PACS go
to another facility.

The hub cannot send it itself: a package is signed with the facility's own key, which
stays on the facility's side. So the hub keeps the request for the facility, and the
facility's side (``emix smart shares --pacs URL``, run by the gateway's timer) takes the
requests and sends each study with the DICOMweb adapter's send path
(``emix dicomweb send``).
"""

from __future__ import annotations

import hmac
import secrets
from datetime import timedelta
from typing import Any

from flask import Blueprint, g, jsonify, request
from werkzeug.wrappers import Response

from emix_core import (
    AuditAction,
    AuditEvent,
    EmixError,
    LaunchRejected,
    audit_hub_event,
    current_principal,
    is_allowed,
    is_valid_address,
    is_valid_uid,
    utcnow,
)

from . import context as store
from . import fhir
from .pages import _live_context
from .views import FHIR_ID, _notice, _refused, bp

api = Blueprint("smart_launch_api", __name__, url_prefix="/api/v1/smart")

#: A request waits this long for the facility's side to take it.
SHARE_TTL = timedelta(days=7)
#: Requests handed over per call at most (the rest wait for the next call).
MAX_TAKEN = 100


def _queue(facility: str) -> str:
    return f"shares:{facility}"


def queue_share(facility: str, share: dict[str, Any]) -> None:
    """Keep a request for the facility's side (a record of its own in the facility's queue)."""
    store.records().put(f"share:{share['id']}", share, SHARE_TTL, group=_queue(facility))


@bp.post("/share/<imaging_id>")
def share(imaging_id: str) -> Response:
    """Ask the facility's side to send one of the EMR's imaging studies to a facility."""
    try:
        if not FHIR_ID.fullmatch(imaging_id):
            raise LaunchRejected("not a FHIR resource id")
        context, reader = _live_context()
        sent = request.form.get("csrf", "")
        if not sent or not hmac.compare_digest(sent, str(context.get("csrf", ""))):
            raise LaunchRejected("the form expired; reload the page and try again")
        to = request.form.get("to", "").strip().lower()[:64]
        principal = g.principal
        if not is_valid_address(to) or to == principal.facility:
            raise LaunchRejected(
                "name another facility by its emix address (lowercase letters, digits, '-')"
            )
        imaging = reader.read(f"ImagingStudy/{imaging_id}")
        subject = str((imaging.get("subject") or {}).get("reference") or "")
        uid = fhir.study_uid_of(imaging)
        if subject != f"Patient/{context['patient']}" or not uid:
            raise LaunchRejected("the EMR's study is not of the patient in context")
        if not is_valid_uid(uid):  # a wildcard or a list would be a query of the PACS
            raise LaunchRejected(
                "the EMR's study names something that is not a DICOM Study Instance UID"
            )
    except EmixError as exc:
        return _refused(exc, getattr(g.get("principal"), "email", "unknown"))
    queue_share(
        principal.facility,
        {
            "id": secrets.token_hex(8),
            "study_uid": uid,
            "to": to,
            "requested_by": principal.email,
            "requested_at": utcnow().isoformat(timespec="seconds"),
        },
    )
    audit_hub_event(
        AuditEvent(
            event_type="export",
            action=AuditAction.CREATE,
            actor=principal.email,
            phi={"patient": context["patient"], "studies": [uid]},
            detail=f"share with {to} requested from the EMR",
        )
    )
    return _notice(
        f"Sharing with {to}",
        f"Your facility's emix gateway sends the study from your PACS to {to}; they are "
        "told by mail when it arrives.",
        202,
    )


@api.get("/shares")
def take_shares() -> Any:
    """The facility's pending share requests, handed over once (facility admin's token).

    Only a token takes them: the browser's session cookie also authenticates GETs, and any
    site can send an administrator's browser here; the requests would be handed to that
    browser and never sent.
    """
    by_token = request.headers.get("Authorization", "").lower().startswith("bearer ")
    principal = current_principal()
    if not by_token or not is_allowed(principal, "member:list", principal.facility):
        return jsonify({"error": "not_found", "message": "not found"}), 404
    shares = store.records().take_group(_queue(principal.facility), limit=MAX_TAKEN)
    if shares:
        audit_hub_event(
            AuditEvent(
                event_type="export",
                action=AuditAction.READ,
                actor=principal.email,
                phi={"studies": [s["study_uid"] for s in shares]},
                detail=f"{len(shares)} share requests taken by the facility's side",
            )
        )
    return jsonify({"shares": shares})
