"""The second-factor step of administrators' pages (``/admin/2fa``).

A mailed link signs a member in; an administrator's session reaches ``/admin`` only after
the second factor too, so a mailbox alone does not open a facility's administration. The
first visit enrols an authenticator app (secret, ``otpauth://`` URI, QR code); enrolment
completes with a valid code and shows ten one-time recovery codes once. Later sessions type
a code from the app or a recovery code. Wrong codes count per administrator in the hub's
one throttle; each is a *Security Alert* in the audit trail, the lock-out a serious one.
Members who are not administrators never see these pages (404).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from flask import Blueprint, Response, redirect, request

from emix_core.errors import NotFoundError
from emix_core.hub import second_factor
from emix_core.hub import sessions as web_sessions
from emix_core.hub.auth import audit_request, client_source
from emix_core.hub.outbox import queue_mail
from emix_core.hub.web import (
    check_csrf,
    current_web_session,
    hub,
    member_required,
    message,
    render_page,
)
from emix_core.model import AuditAction, AuditEvent, AuditOutcome, utcnow

bp = Blueprint("web_second_factor", __name__, url_prefix="/admin/2fa")

CODE_MAX = 32


class SecondFactorRequired(Exception):
    """An administrator's session has not passed the second factor yet."""


@bp.app_errorhandler(SecondFactorRequired)
def _second_factor_required(_exc: SecondFactorRequired) -> Any:
    # where to go back to: a page of the administration only, never a form's target
    target = request.full_path.rstrip("?") if request.method == "GET" else "/admin"
    return redirect(_step_url(target), code=303)


def _step_url(target: str) -> str:
    return f"/admin/2fa?next={quote(_safe_next(target), safe='/')}"


def _safe_next(target: str | None) -> str:
    target = (target or "/admin")[:500]
    if not (target.isascii() and target.isprintable()) or "\\" in target or " " in target:
        return "/admin"
    if not target.startswith("/admin") or target.startswith("/admin/2fa"):
        return "/admin"
    return target


def administrator() -> Any:
    """The signed-in administrator (any other visitor: the page does not exist)."""
    principal = member_required()
    if not (principal.is_admin and principal.verified):
        raise NotFoundError("not found")
    return principal


def passed() -> bool:
    """Whether this browser session passed the second factor."""
    ws = current_web_session()
    return ws is not None and ws.second_factor_at is not None


def require_second_factor() -> None:
    """Raise :class:`SecondFactorRequired` (answered by a redirect to the step) unless
    this session passed it."""
    if not passed():
        raise SecondFactorRequired()


def _key(email: str) -> str:
    return f"2fa:{email}"


@bp.get("")
def step() -> Any:
    """Enrol (first time) or type a code (every new session)."""
    principal = administrator()
    target = _safe_next(request.args.get("next"))
    if passed():
        return redirect(target, code=303)
    with hub().db.session() as session:
        if second_factor.is_enrolled(session, principal.member_id):
            return render_page("admin_2fa.html", enrolled=True, next=target)
    return _enrolment_page(principal, target)


def _enrolment_page(principal: Any, target: str, status: int = 200, error: str = "") -> Response:
    h = hub()
    with h.db.session() as session:
        secret = second_factor.pending_secret(h, session, principal.member_id)
    uri = second_factor.provisioning_uri(h, secret, principal.email)
    return render_page(
        "admin_2fa.html",
        status=status,
        enrolled=False,
        next=target,
        error=error,
        secret=" ".join(secret[i : i + 4] for i in range(0, len(secret), 4)),
        uri=uri,
        qr=second_factor.qr_svg(uri),
    )


def _throttled(email: str) -> bool:
    with hub().db.session() as session:
        return web_sessions.throttled(session, _key(email))


def _locked_out() -> Response:
    return message(
        "Please wait",
        "Too many wrong codes for this administrator. Try again in 15 minutes, or ask the "
        "hub's operator to reset your second factor if you lost your phone.",
        status=429,
    )


def _failure(principal: Any, what: str) -> int:
    """Count a wrong code; every one is a Security Alert, the lock-out a serious one."""
    h = hub()
    count = web_sessions.count_attempt(h, _key(principal.email))
    locked = count >= web_sessions.MAX_FAILURES
    h.audit(
        AuditEvent(
            event_type="security-alert",
            action=AuditAction.EXECUTE,
            outcome=AuditOutcome.SERIOUS_FAILURE if locked else AuditOutcome.MINOR_FAILURE,
            actor=principal.email,
            source=client_source(),
            detail=(
                f"administrator's second factor: wrong {what}; locked for 15 minutes"
                if locked
                else f"administrator's second factor: wrong {what}"
            ),
        )
    )
    if count == web_sessions.MAX_FAILURES:
        _alert(h, principal)
    return count


def _alert(h: Any, principal: Any) -> None:
    """Tell the hub's operator, once per lock-out (no code, no PHI)."""
    to = h.config.hub.alert_email
    if not to or not h.config.smtp.url:
        return
    body = (
        f"The emix hub at {h.config.hub.public_url} locked the second factor of an "
        f"administrator after {web_sessions.MAX_FAILURES} wrong codes.\n\n"
        f"Administrator: {principal.email} ({principal.facility})\n"
        f"Client address: {client_source()}\n"
        f"Time (UTC): {utcnow():%Y-%m-%d %H:%M:%S}\n\n"
        "Someone who can read this administrator's mail may be trying to reach the\n"
        "facility's administration. Look for security-alert events in the audit log.\n"
    )
    queue_mail(h, to, "emix security alert: administrator's second factor locked", body, "alert")


def _passed(principal: Any, how: str, target: str) -> Any:
    ws = current_web_session()
    with hub().db.session() as session:
        second_factor.mark_session(session, ws.id)
    audit_request(
        "user-authentication",
        action=AuditAction.EXECUTE,
        actor=principal.email,
        detail=f"administrator's second factor passed ({how})",
    )
    return redirect(target, code=303)


@bp.post("/verify")
def verify() -> Any:
    """Check a code from the authenticator app, or a recovery code."""
    principal = administrator()
    check_csrf()
    target = _safe_next(request.form.get("next"))
    if passed():
        return redirect(target, code=303)
    if _throttled(principal.email):
        return _locked_out()
    code = request.form.get("code", "")[:CODE_MAX]
    h = hub()
    with h.db.session() as session:
        if not second_factor.is_enrolled(session, principal.member_id):
            return redirect(_step_url(target), code=303)
        how = second_factor.verify(h, session, principal.member_id, code)
        left = second_factor.remaining_recovery_codes(session, principal.member_id)
    if how is None:
        what = "recovery code" if second_factor.looks_like_recovery_code(code) else "code"
        if _failure(principal, what) >= web_sessions.MAX_FAILURES:
            return _locked_out()
        return render_page(
            "admin_2fa.html",
            status=400,
            enrolled=True,
            next=target,
            error="That code is not right, or it was used already. Wait for the next code "
            "of your authenticator app and try again.",
        )
    if how == "recovery code":
        target = f"/admin?done=recovery&left={left}"
    return _passed(principal, "authenticator app" if how == "totp" else how, target)


@bp.post("/enrol")
def enrol() -> Any:
    """Complete enrolment with a first valid code; show the recovery codes once."""
    principal = administrator()
    check_csrf()
    if passed():
        return redirect("/admin", code=303)
    if _throttled(principal.email):
        return _locked_out()
    h = hub()
    code = request.form.get("code", "")[:CODE_MAX]
    target = _safe_next(request.form.get("next"))
    with h.db.session() as session:
        if second_factor.is_enrolled(session, principal.member_id):
            return redirect(_step_url(target), code=303)
        codes = second_factor.complete_enrolment(h, session, principal.member_id, code)
    if codes is None:
        if _failure(principal, "enrolment code") >= web_sessions.MAX_FAILURES:
            return _locked_out()
        return _enrolment_page(
            principal,
            target,
            status=400,
            error="That code is not right. Type the 6 digits your authenticator app shows now.",
        )
    h.audit(
        AuditEvent(
            event_type="security-alert",
            action=AuditAction.CREATE,
            actor=principal.email,
            source=client_source(),
            detail="administrator's second factor enrolled (authenticator app, recovery codes)",
        )
    )
    ws = current_web_session()
    with h.db.session() as session:
        second_factor.mark_session(session, ws.id)
    return render_page("admin_recovery_codes.html", codes=codes, next=target)


@bp.post("/recovery-codes")
def renew_recovery_codes() -> Any:
    """Ten new recovery codes for the signed-in administrator (the old ones stop working)."""
    from emix_core.hub.web_admin import admin_required

    principal = admin_required()
    check_csrf()
    h = hub()
    with h.db.session() as session:
        codes = second_factor.new_recovery_codes(session, principal.member_id)
    h.audit(
        AuditEvent(
            event_type="security-alert",
            action=AuditAction.UPDATE,
            actor=principal.email,
            source=client_source(),
            detail="administrator's recovery codes replaced",
        )
    )
    return render_page("admin_recovery_codes.html", codes=codes, next="/admin", renewed=True)
