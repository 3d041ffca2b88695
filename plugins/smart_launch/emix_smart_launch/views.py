"""The SMART launch: ``/smart/launch`` and ``/smart/callback``; the blueprint and its policy."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from typing import Any

from flask import Blueprint, redirect, request
from werkzeug.wrappers import Response

from emix_core import (
    AuditAction,
    AuditEvent,
    AuditOutcome,
    EmixError,
    LaunchRejected,
    audit_hub_event,
    hub_public_url,
    render_page,
    sign_in_member,
    verified_member,
)

from . import context as store
from . import fhir, oauth
from .settings import SmartSettings, load_settings, normalize

log = logging.getLogger("emix.smart")

bp = Blueprint("smart_launch", __name__, url_prefix="/smart", template_folder="templates")

CONTEXT_COOKIE = "emix_smart"
TX_COOKIE = "emix_smart_tx"
#: A FHIR resource id (R4 ``id``): what the EMR's context may name, nothing else.
FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


# --------------------------------------------------------------------------- plumbing


def _secure() -> bool:
    return hub_public_url().startswith("https://")


def _set_cookie(response: Response, name: str, value: str, max_age: int) -> None:
    """Cookies that also work inside the EMR's iframe: ``SameSite=None; Secure;
    Partitioned`` over HTTPS (a plain-HTTP test hub gets ``Lax``)."""
    secure = _secure()
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/smart",
        httponly=True,
        secure=secure,
        samesite="None" if secure else "Lax",
        partitioned=secure,
    )


def _notice(title: str, text: str, status: int, hint: str = "") -> Response:
    return render_page("smart_notice.html", status=status, title=title, text=text, hint=hint)


def _refused(exc: EmixError, actor: str = "unknown") -> Response:
    audit_hub_event(
        AuditEvent(
            event_type="user-authentication",
            action=AuditAction.EXECUTE,
            outcome=AuditOutcome.MINOR_FAILURE,
            actor=actor,
            detail=f"SMART launch refused: {exc.message}"[:500],
        )
    )
    return _notice(
        "emix could not open from the EMR",
        exc.message,
        exc.http_status,
        "Nothing was shown. If this keeps happening, tell your emix administrator.",
    )


@bp.after_request
def _frame_policy(response: Response) -> Response:
    """The SMART pages may render inside the EMR's iframe (``frame_ancestors``)."""
    try:
        origins = " ".join(load_settings().frame_ancestors) or "'none'"
    except EmixError:
        origins = "'none'"
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
        f"form-action 'self'; base-uri 'none'; frame-ancestors {origins}"
    )
    return response


def _settings() -> SmartSettings:
    settings = load_settings()
    if not settings.configured:
        raise LaunchRejected(
            "SMART launch is not set up on this hub: its operator sets [smart] allowed_issuers "
            "and client_id in emix.toml"
        )
    return settings


def _redirect_uri() -> str:
    return f"{hub_public_url()}/smart/callback"


def _binding(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- launch


@bp.get("/launch")
def launch() -> Response:
    """EHR launch (``iss`` and ``launch``) or standalone launch (neither)."""
    iss = request.args.get("iss", "").strip()[:500]
    launch_token = request.args.get("launch", "").strip()[:2000]
    try:
        settings = _settings()
        standalone = not launch_token
        if standalone and not iss:
            iss = settings.standalone_issuer or settings.allowed_issuers[0]
        if not iss:
            raise LaunchRejected("the EMR sent a launch without its FHIR server (iss)")
        if not settings.issuer_allowed(iss):
            raise LaunchRejected(
                f"the FHIR server {normalize(iss)} is not on this hub's list of EMRs allowed to "
                "launch emix; its operator adds it to [smart] allowed_issuers"
            )
        server = oauth.discover(iss)
        url, transaction = oauth.authorization_url(
            settings, server, _redirect_uri(), launch=launch_token or None, standalone=standalone
        )
    except EmixError as exc:
        return _refused(exc)
    browser = secrets.token_urlsafe(32)
    transaction["browser"] = _binding(browser)
    store.save_transaction(transaction, settings.launch_timeout_seconds)
    response = redirect(url, code=302)
    _set_cookie(response, TX_COOKIE, browser, settings.launch_timeout_seconds)
    return response


@bp.get("/callback")
def callback() -> Response:
    """The EMR's answer: check state and browser, exchange the code, verify the id_token."""
    try:
        return _callback()
    except EmixError as exc:
        return _refused(exc)


def _callback() -> Response:
    settings = _settings()
    if request.args.get("error"):
        error = request.args.get("error", "")[:64]
        raise LaunchRejected(f"the EMR did not authorize emix ({error})")
    state = request.args.get("state", "")[:200]
    code = request.args.get("code", "")[:4000]
    if not state:
        raise LaunchRejected("the EMR's answer carries no state; launch emix again from the chart")
    transaction = store.take_transaction(state)
    if transaction is None:
        raise LaunchRejected(
            "this sign-in was already used or has expired; launch emix again from the chart"
        )
    browser = request.cookies.get(TX_COOKIE, "")
    if not browser or not hmac.compare_digest(_binding(browser), transaction["browser"]):
        raise LaunchRejected(
            "this sign-in was started in another browser; launch emix again from the chart"
        )
    if not code:
        raise LaunchRejected("the EMR's answer carries no authorization code")
    server = oauth.discover(transaction["iss"])
    tokens = oauth.exchange_code(settings, server, _redirect_uri(), code, transaction["verifier"])
    if not tokens.get("id_token"):
        raise LaunchRejected("the EMR sent no id_token; emix needs the openid scope")
    claims = oauth.verify_id_token(settings, server, tokens["id_token"], transaction["nonce"])
    patient = str(tokens.get("patient") or "")
    if not patient:
        raise LaunchRejected("the EMR gave no patient context; open emix from a patient's chart")
    if not FHIR_ID.fullmatch(patient):
        raise LaunchRejected("the EMR's patient context is not a FHIR resource id")
    member = _member_of(server, tokens, claims)
    if member is None:
        return _notice(
            "You are not an emix member yet",
            "The EMR signed you in, but your address is not a verified member of a facility "
            "on this emix hub, so nothing can be shown.",
            403,
            "Ask your facility's emix administrator to add you as a member with the email "
            "address your EMR profile lists.",
        )
    if member.facility not in settings.facilities_of(server.iss):
        raise LaunchRejected(
            "your emix membership is in a facility that is not one this EMR may sign in; "
            "the hub's operator names the facilities each EMR serves in [smart] "
            "issuer_facilities"
        )
    tokens["expires_at"] = oauth_expiry(tokens)
    handle = store.save_context(
        {
            "iss": server.iss,
            "patient": patient,
            "member_id": member.member_id,
            "fhir_user": str(claims.get("fhirUser") or ""),
            "scope": str(tokens.get("scope") or transaction["scope"]),
            "csrf": secrets.token_urlsafe(32),
        },
        {k: tokens[k] for k in ("access_token", "refresh_token", "expires_at") if k in tokens},
    )
    response = redirect(_landing(tokens, server, patient), code=303)
    _set_cookie(response, CONTEXT_COOKIE, handle, int(store.CONTEXT_TTL.total_seconds()))
    response.delete_cookie(TX_COOKIE, path="/smart")
    return sign_in_member(response, member.member_id, detail="signed in from the EMR (SMART)")


def oauth_expiry(tokens: dict[str, Any]) -> float:
    return time.time() + float(tokens.get("expires_in") or 300)


def _member_of(server: oauth.Server, tokens: dict[str, Any], claims: dict[str, Any]) -> Any:
    """The verified member the EMR's user is: by the email of their ``fhirUser`` resource
    (Practitioner), else the id_token's verified ``email``."""
    emails: list[str] = []
    fhir_user = str(claims.get("fhirUser") or "")
    if fhir_user:
        reader = fhir.FhirReader(server.iss, tokens["access_token"])
        emails += fhir.emails_of(reader.read(fhir_user))
    if claims.get("email") and claims.get("email_verified") is True:
        emails.append(str(claims["email"]).lower())
    for email in dict.fromkeys(emails):
        member = verified_member(email)
        if member is not None:
            return member
    return None


def _landing(tokens: dict[str, Any], server: oauth.Server, patient: str) -> str:
    """The patient's page; straight to the viewer when the EMR launched emix for one study
    that was received (SMART 2 ``fhirContext`` naming an ImagingStudy)."""
    for item in tokens.get("fhirContext") or []:
        reference = str(item.get("reference") or "") if isinstance(item, dict) else ""
        study = reference.removeprefix("ImagingStudy/")
        if reference.startswith("ImagingStudy/") and FHIR_ID.fullmatch(study):
            return f"/smart/study/{study}"
    return "/smart/"
