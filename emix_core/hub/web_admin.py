"""Pages of a facility administrator: members, pending confirmations, audit trail, usage.

An administrator manages their own facility only, and reaches these pages only after the
second factor of this browser session (:mod:`.web_second_factor`). Inviting a member
verifies them and mails a sign-in link; they confirm their address with a code the first
time. Disabling a member ends their sessions and revokes their tokens at once; resetting
makes them confirm their address again.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from flask import Blueprint, Response, redirect, request
from sqlalchemy import func, select

from emix_core.errors import NotFoundError
from emix_core.hub import pacs_push, second_factor
from emix_core.hub import sessions as web_sessions
from emix_core.hub.api_facilities import EMAIL_RE
from emix_core.hub.auth import audit_request
from emix_core.hub.pacs_network import parse_networks
from emix_core.hub.usage import monthly_usage
from emix_core.hub.web import _mail, check_csrf, hub, render_page
from emix_core.hub.web_second_factor import administrator, require_second_factor
from emix_core.model import AuditAction, utcnow
from emix_core.store.db import (
    Facility,
    Member,
    PackageRecipient,
    PackageRow,
    WebIdentity,
    WebLink,
    WebSession,
)

bp = Blueprint("web_admin", __name__, url_prefix="/admin")

AUDIT_SCAN = 20_000


def admin_required() -> Any:
    """The administrator of this request, once their session passed the second factor
    (anyone else: 404; an administrator without it: redirected to the step)."""
    principal = administrator()
    require_second_factor()
    return principal


def _facility(session: Any, principal: Any) -> Facility:
    return session.scalar(select(Facility).where(Facility.address == principal.facility))


def member_rows(session: Any, facility: Facility) -> list[dict[str, Any]]:
    now = utcnow()
    rows = []
    for m in session.scalars(
        select(Member).where(Member.facility_id == facility.id).order_by(Member.email)
    ):
        active = session.scalar(
            select(func.count())
            .select_from(WebSession)
            .where(
                WebSession.member_id == m.id,
                WebSession.ended_at.is_(None),
                WebSession.last_seen > now - web_sessions.IDLE,
            )
        )
        confirmed = session.get(WebIdentity, m.id) is not None or m.confirmed_at is not None
        rows.append(
            {
                "id": m.id,
                "email": m.email,
                "role": m.role,
                "verified": m.verified,
                "confirmed": confirmed,
                "two_factor": m.role == "admin" and second_factor.is_enrolled(session, m.id),
                "sessions": active,
                "since": m.created,
            }
        )
    return rows


@bp.get("")
def overview() -> Response:
    principal = admin_required()
    with hub().db.session() as session:
        facility = _facility(session, principal)
        members = member_rows(session, facility)
        pending = [m for m in members if m["verified"] and not m["confirmed"]]
        links = session.scalar(
            select(func.count())
            .select_from(WebLink)
            .join(Member, WebLink.member_id == Member.id)
            .where(
                Member.facility_id == facility.id,
                WebLink.used_at.is_(None),
                WebLink.expires > utcnow(),
            )
        )
        name = facility.name
        pacs = pacs_push.destination_of(session, principal.facility)
        pacs_info = {"name": pacs.name, "url": pacs.url} if pacs else None
        recovery_left = second_factor.remaining_recovery_codes(session, principal.member_id)
    month = request.args.get("month") or utcnow().strftime("%Y-%m")
    usage = next(
        (
            f
            for f in monthly_usage(hub(), month)["facilities"]
            if f["address"] == principal.facility
        ),
        None,
    )
    return render_page(
        "admin.html",
        active="admin",
        facility_name=name,
        members=members,
        pending=pending,
        open_links=links,
        usage=usage,
        month=month,
        notice=_notice(request.args.get("done", ""), request.args.get("left", "")),
        pacs=pacs_info,
        recovery_left=recovery_left,
    )


NOTICES = {
    "invited": "Invitation sent: the new member gets a sign-in link by mail.",
    "disabled": "Member disabled: their sessions ended and their tokens were revoked.",
    "enabled": "Member enabled again.",
    "reset": "Reset: the member confirms their address again with a new link.",
    "pacs": "PACS destination saved.",
    "reset-2fa": "Second factor reset: that administrator sets up an authenticator app again "
    "at their next visit; their sessions ended.",
}


def _notice(done: str, left: str) -> str:
    if done == "recovery":
        # a link anyone can send: a number of recovery codes (0-10), nothing else
        count = int(left) if left.isascii() and left.isdigit() and len(left) <= 2 else 0
        return (
            f"You used a recovery code; {count} left. Set up your authenticator app again "
            "if you lost it: ask another administrator or the hub's operator to reset "
            "your second factor."
        )
    return NOTICES.get(done, "")


def _done(what: str) -> Any:
    return redirect(f"/admin?done={what}", code=303)


def _own_member(session: Any, principal: Any, member_id: int) -> Member:
    facility = _facility(session, principal)
    member = session.get(Member, member_id)
    if member is None or member.facility_id != facility.id:
        raise NotFoundError("not found")
    return member


@bp.post("/members")
def invite() -> Any:
    principal = admin_required()
    check_csrf()
    email = request.form.get("email", "").strip().lower()[:254]
    role = request.form.get("role", "member")
    if not EMAIL_RE.match(email) or role not in ("member", "admin"):
        return render_page(
            "message.html",
            status=400,
            title="Check the address",
            text="Give a valid work email address and a role of member or administrator.",
        )
    with hub().db.session() as session:
        if session.scalar(select(Member).where(Member.email == email)):
            return render_page(
                "message.html",
                status=409,
                title="Already a member",
                text="That address is already a member of a facility on this hub.",
            )
        member = Member(
            facility_id=_facility(session, principal).id, email=email, role=role, verified=True
        )
        session.add(member)
        session.flush()
        token = web_sessions.create_link(session, member.id)
    _mail(
        email,
        "You were invited to emix",
        f"Your facility's administrator added you to emix, where colleagues share medical "
        f"images and reports with you.\n\nSign in here (the link works once, for 72 hours):\n\n"
        f"{web_sessions.link_url(hub(), token)}\n"
        + (
            "\nYou administer your facility too: the first time you open Administration, "
            "have your phone ready to set up an authenticator app.\n"
            if role == "admin"
            else ""
        ),
    )
    audit_request(
        "security-alert",
        action=AuditAction.CREATE,
        actor=principal.email,
        detail=f"member invited as {role} (web)",
    )
    return _done("invited")


@bp.post("/members/<int:member_id>/<action>")
def member_action(member_id: int, action: str) -> Any:
    principal = admin_required()
    check_csrf()
    if action not in ("disable", "enable", "reset", "reset-2fa"):
        raise NotFoundError("not found")
    mail_to = token = None
    with hub().db.session() as session:
        member = _own_member(session, principal, member_id)
        if member.id == principal.member_id and action != "reset":
            return render_page(
                "message.html",
                status=409,
                title="Not on yourself",
                text="Ask another administrator of your facility to do this.",
            )
        if action == "disable":
            member.verified = False
            web_sessions.end_member_sessions(session, member.id)
        elif action == "enable":
            member.verified = True
        elif action == "reset-2fa":
            if member.role != "admin":
                raise NotFoundError("not found")
            second_factor.reset(session, member.id)
        else:
            web_sessions.end_member_sessions(session, member.id)
            identity = session.get(WebIdentity, member.id)
            if identity is not None:
                session.delete(identity)
            token = web_sessions.create_link(session, member.id)
            mail_to = member.email
    if mail_to and token:
        _mail(
            mail_to,
            "Your emix sign-in was reset",
            "Your administrator reset your emix sign-in. Confirm your address again here "
            f"(the link works once, for 72 hours):\n\n{web_sessions.link_url(hub(), token)}\n",
        )
    audit_request(
        "security-alert",
        action=AuditAction.UPDATE,
        actor=principal.email,
        detail="administrator's second factor reset by an administrator"
        if action == "reset-2fa"
        else f"member {action}d by an administrator",
    )
    return _done(
        {"disable": "disabled", "enable": "enabled", "reset": "reset", "reset-2fa": "reset-2fa"}[
            action
        ]
    )


@bp.post("/pacs")
def set_pacs() -> Any:
    """Name the facility's PACS (DICOMweb STOW-RS root) for "Send to my PACS"."""
    principal = admin_required()
    check_csrf()
    with hub().db.session() as session:
        pacs_push.set_destination(
            session,
            _facility(session, principal).id,
            request.form.get("name", "")[:100],
            request.form.get("url", "")[:500],
            parse_networks(hub().config.hub.pacs_networks),
        )
    audit_request(
        "security-alert",
        action=AuditAction.UPDATE,
        actor=principal.email,
        detail="PACS destination changed",
    )
    return _done("pacs")


@bp.get("/audit")
def audit() -> Response:
    """Who did what with which package and study, when: events about this facility."""
    principal = admin_required()
    who = request.args.get("who", "").strip().lower()[:254]
    package = request.args.get("package", "").strip().lower()[:32]
    days = min(max(request.args.get("days", 30, type=int) or 30, 1), 365)
    h = hub()
    with h.db.session() as session:
        facility = _facility(session, principal)
        emails = set(session.scalars(select(Member.email).where(Member.facility_id == facility.id)))
        sent = set(
            session.scalars(
                select(PackageRow.id).where(PackageRow.sender_facility_id == facility.id)
            )
        )
        received = set(
            session.scalars(
                select(PackageRecipient.package_id).where(
                    PackageRecipient.facility_id == facility.id
                )
            )
        )
    packages = sent | received
    since = utcnow() - timedelta(days=days)
    events = []
    for event in reversed(h.audit_log.events(since=since, limit=AUDIT_SCAN, include_phi=True)):
        ours = event["actor"] in emails or (event["package_id"] in packages)
        if not ours:
            continue
        if who and who not in (event["actor"] or "").lower():
            continue
        if package and not (event["package_id"] or "").startswith(package):
            continue
        events.append(event)
        if len(events) >= 500:
            break
    audit_request(
        "query",
        action=AuditAction.EXECUTE,
        actor=principal.email,
        detail=f"audit trail searched ({len(events)} events)",
    )
    return render_page(
        "admin_audit.html", active="admin", events=events, who=who, package=package, days=days
    )
