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

from flask import Blueprint, Response, g, redirect, request

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
    set_session_cookie,
)
from emix_core.model import AuditAction, AuditOutcome, utcnow
from emix_core.store.db import Attempt

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
        secret = second_factor.pending_secret(
            h, session, principal.member_id, current_web_session().id
        )
    if secret is None:
        return _elsewhere(principal)
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


def _elsewhere(principal: Any) -> Response:
    """Another browser of this administrator is setting up an authenticator app now: this
    one is shown no secret (whoever reads their mail must not see the one they enrol)."""
    audit_request(
        "security-alert",
        action=AuditAction.EXECUTE,
        outcome=AuditOutcome.MINOR_FAILURE,
        actor=principal.email,
        detail="administrator's second factor: enrolment opened while another browser "
        "is enrolling; no secret shown",
    )
    return message(
        "Setting up in another browser",
        "An authenticator app is being set up for this administrator in another browser "
        "right now. Finish there; or, if that was not you, tell the hub's operator at once. "
        "This page can start a new set-up once the other browser signed out or left it "
        "for 15 minutes.",
        status=409,
    )


def _locked_out() -> Response:
    return message(
        "Please wait",
        "Too many wrong codes for this administrator. Try again in 15 minutes, or ask the "
        "hub's operator to reset your second factor if you lost your phone.",
        status=429,
    )


def _reserve(email: str) -> tuple[int, int]:
    """Count this attempt *before* its code is checked: ``(attempt id, count)``.

    The attempt is committed first and counted after, so of codes posted at the same
    instant (many connections, several hub processes) at most :data:`MAX_FAILURES` are
    ever checked: each sees at least the attempts committed before its own.
    """
    h = hub()
    with h.db.session() as session:
        attempt = Attempt(key=_key(email)[:100], time=utcnow())
        session.add(attempt)
        session.flush()
        attempt_id = attempt.id
    with h.db.session() as session:
        return attempt_id, web_sessions.failures(session, _key(email))


def _release(attempt_id: int) -> None:
    """Forget a counted attempt (its code was right, or it was refused unchecked)."""
    with hub().db.session() as session:
        found = session.get(Attempt, attempt_id)
        if found is not None:
            session.delete(found)


def _failure(principal: Any, what: str, count: int) -> None:
    """A wrong code (already counted): every one is a Security Alert, the lock-out a
    serious one."""
    h = hub()
    locked = count >= web_sessions.MAX_FAILURES
    audit_request(
        "security-alert",
        action=AuditAction.EXECUTE,
        outcome=AuditOutcome.SERIOUS_FAILURE if locked else AuditOutcome.MINOR_FAILURE,
        actor=principal.email,
        detail=(
            f"administrator's second factor: wrong {what}; locked for 15 minutes"
            if locked
            else f"administrator's second factor: wrong {what}"
        ),
    )
    if count == web_sessions.MAX_FAILURES:
        _alert(h, principal)


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


def _elevate(principal: Any, response: Any) -> Any:
    """The browser passed the second factor: end its session and give it a new one that
    did. A session cookie known before the step (planted in the browser, or read off it)
    stays without the administration, and is signed out."""
    with hub().db.session() as session:
        old = current_web_session()
        web_sessions.end_session(session, request.cookies.get(web_sessions.COOKIE))
        token = web_sessions.open_session(session, member_id=principal.member_id)
        row = web_sessions.load_session(session, token)
        assert row is not None
        row.second_factor_at = utcnow()
        row.created = old.created  # the absolute limit counts from the sign-in
        g.web_session = row
    return set_session_cookie(response, token)


def _passed(principal: Any, how: str, target: str) -> Any:
    audit_request(
        "user-authentication",
        action=AuditAction.EXECUTE,
        actor=principal.email,
        detail=f"administrator's second factor passed ({how})",
    )
    return _elevate(principal, redirect(target, code=303))


@bp.post("/verify")
def verify() -> Any:
    """Check a code from the authenticator app, or a recovery code."""
    principal = administrator()
    check_csrf()
    target = _safe_next(request.form.get("next"))
    if passed():
        return redirect(target, code=303)
    code = request.form.get("code", "")[:CODE_MAX]
    h = hub()
    with h.db.session() as session:
        if not second_factor.is_enrolled(session, principal.member_id):
            return redirect(_step_url(target), code=303)
    attempt, count = _reserve(principal.email)
    if count > web_sessions.MAX_FAILURES:
        _release(attempt)  # refused unchecked: it does not prolong the lock
        return _locked_out()
    with h.db.session() as session:
        how = second_factor.verify(h, session, principal.member_id, code)
        left = second_factor.remaining_recovery_codes(session, principal.member_id)
    if how is None:
        what = "recovery code" if second_factor.looks_like_recovery_code(code) else "code"
        _failure(principal, what, count)
        if count >= web_sessions.MAX_FAILURES:
            return _locked_out()
        return render_page(
            "admin_2fa.html",
            status=400,
            enrolled=True,
            next=target,
            error="That code is not right, or it was used already. Wait for the next code "
            "of your authenticator app and try again.",
        )
    _release(attempt)
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
    h = hub()
    code = request.form.get("code", "")[:CODE_MAX]
    target = _safe_next(request.form.get("next"))
    owner = current_web_session().id
    with h.db.session() as session:
        if second_factor.is_enrolled(session, principal.member_id):
            return redirect(_step_url(target), code=303)
        if second_factor.pending_secret(h, session, principal.member_id, owner) is None:
            return redirect(_step_url(target), code=303)  # another browser's enrolment
    attempt, count = _reserve(principal.email)
    if count > web_sessions.MAX_FAILURES:
        _release(attempt)
        return _locked_out()
    with h.db.session() as session:
        codes = second_factor.complete_enrolment(h, session, principal.member_id, code, owner=owner)
    if codes is None:
        _failure(principal, "enrolment code", count)
        if count >= web_sessions.MAX_FAILURES:
            return _locked_out()
        return _enrolment_page(
            principal,
            target,
            status=400,
            error="That code is not right. Type the 6 digits your authenticator app shows now.",
        )
    _release(attempt)
    audit_request(
        "security-alert",
        action=AuditAction.CREATE,
        actor=principal.email,
        detail="administrator's second factor enrolled (authenticator app, recovery codes)",
    )
    page = render_page("admin_recovery_codes.html", codes=codes, next=target)
    return _elevate(principal, page)


@bp.post("/recovery-codes")
def renew_recovery_codes() -> Any:
    """Ten new recovery codes for the signed-in administrator (the old ones stop working)."""
    from emix_core.hub.web_admin import admin_required

    principal = admin_required()
    check_csrf()
    h = hub()
    with h.db.session() as session:
        codes = second_factor.new_recovery_codes(session, principal.member_id)
    audit_request(
        "security-alert",
        action=AuditAction.UPDATE,
        actor=principal.email,
        detail="administrator's recovery codes replaced",
    )
    return render_page("admin_recovery_codes.html", codes=codes, next="/admin", renewed=True)
