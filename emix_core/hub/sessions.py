"""Browser sessions, one-time sign-in links and codes, throttles (plugin ``emix.sessions``).

Everything lives in the hub's database so that any hub process answers any request:

* a **sign-in link** (``/signin/<token>``, 256 random bits, single use, 72 h) is mailed
  when a package arrives or when a member asks for one;
* the **first time**, the link only leads to a one-time code mailed to the same address
  (8 digits, 30 min, at most :data:`MAX_FAILURES` wrong tries per account per window);
* a **session** cookie (random, stored as SHA-256) ends after :data:`IDLE` without a
  request, :data:`ABSOLUTE` after sign-in, on logout, and when the member is disabled.

The cookie authenticates read-only requests (GET/HEAD) of the API and the DICOMweb
service too, so the viewer reads with it; anything that changes state needs a form
with the session's CSRF token.
"""

from __future__ import annotations

import hmac
import secrets
from datetime import datetime, timedelta
from typing import Any

from flask import current_app
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from emix_core.hub import throttle
from emix_core.hub.auth import hash_secret
from emix_core.model import AuditAction, AuditEvent, AuditOutcome, Principal, utcnow
from emix_core.plugins import hookimpl
from emix_core.store.db import Facility, Member, Token, WebLink, WebSession

COOKIE = "emix_session"
CSRF_COOKIE = "emix_csrf"
LINK_TTL = timedelta(hours=72)
CODE_TTL = timedelta(minutes=30)
IDLE = timedelta(minutes=15)
ABSOLUTE = timedelta(hours=12)
THROTTLE_WINDOW = timedelta(minutes=15)
MAX_FAILURES = 5


def aware(moment: datetime) -> datetime:
    """SQLite returns naive datetimes; every time here is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=utcnow().tzinfo)


def _hub() -> Any:
    return current_app.extensions["emix"]


# --------------------------------------------------------------------------- links and codes


def create_link(session: Session, member_id: int, package_id: str | None = None) -> str:
    """A new single-use sign-in link token for a member (plaintext returned once)."""
    token = secrets.token_urlsafe(32)
    session.add(
        WebLink(
            token_hash=hash_secret(token),
            member_id=member_id,
            package_id=package_id,
            expires=utcnow() + LINK_TTL,
        )
    )
    return token


def link_url(hub: Any, token: str) -> str:
    return f"{hub.config.hub.public_url.rstrip('/')}/signin/{token}"


def package_link(hub: Any, session: Session, facility_id: int, email: str, package_id: str) -> str:
    """The link mailed to ``email`` about a package: a sign-in link when they are a member."""
    member = session.scalar(
        select(Member).where(Member.facility_id == facility_id, Member.email == email)
    )
    if member is None:
        return f"{hub.config.hub.public_url.rstrip('/')}/packages/{package_id}"
    return link_url(hub, create_link(session, member.id, package_id))


def operator_sign_in_link(hub: Any, email: str, package_id: str | None = None) -> str:
    """A one-click sign-in link for a verified member, made by the hub's operator.

    The operator vouches for the address (as for ``emix demo``): the member is not asked
    for a mailed code. The link still works once and expires in 72 h.
    """
    from emix_core.errors import NotFoundError
    from emix_core.store.db import WebIdentity

    with hub.db.session() as session:
        member = session.scalar(select(Member).where(Member.email == email.strip().lower()))
        if member is None or not member.verified:
            raise NotFoundError(f"no verified member with the address {email!r} on this hub")
        if session.get(WebIdentity, member.id) is None:
            session.add(WebIdentity(member_id=member.id))
        token = create_link(session, member.id, package_id)
    hub.audit_operator(AuditAction.CREATE, "one-click sign-in link made by the hub operator")
    return link_url(hub, token)


def find_link(session: Session, token: str) -> WebLink | None:
    """The unused, unexpired link with this token, or ``None``."""
    if not token or len(token) > 100:
        return None
    link = session.scalar(select(WebLink).where(WebLink.token_hash == hash_secret(token)))
    if link is None or link.used_at is not None or aware(link.expires) < utcnow():
        return None
    return link


def new_code(link: WebLink) -> str:
    """Give the link a fresh one-time code (8 digits); the old one stops working."""
    code = f"{secrets.randbelow(10**8):08d}"
    link.code_hash = hash_secret(f"{link.id}:{code}")
    link.code_expires = utcnow() + CODE_TTL
    return code


def code_matches(link: WebLink, code: str) -> bool:
    code = "".join(c for c in code if c.isdigit())
    if not link.code_hash or not link.code_expires or aware(link.code_expires) < utcnow():
        return False
    return hmac.compare_digest(link.code_hash, hash_secret(f"{link.id}:{code}"))


# --------------------------------------------------------------------------- throttles


def failures(session: Session, key: str) -> int:
    """Failed attempts under ``key`` within the throttle window (the hub's one throttle)."""
    return throttle.failures(session, key, THROTTLE_WINDOW)


def throttled(session: Session, key: str, limit: int = MAX_FAILURES) -> bool:
    return failures(session, key) >= limit


def count_attempt(hub: Any, key: str) -> int:
    """Count one attempt under ``key`` (rate limits); returns the count in the window."""
    return throttle.count_attempt(hub, key, THROTTLE_WINDOW)


def record_failure(hub: Any, key: str, source: str, detail: str, limit: int = MAX_FAILURES) -> int:
    """Count a failed attempt; at the limit, raise a Security Alert audit event."""
    count = count_attempt(hub, key)
    alert = count >= limit
    hub.audit(
        AuditEvent(
            event_type="security-alert" if alert else "user-authentication",
            action=AuditAction.EXECUTE,
            outcome=AuditOutcome.SERIOUS_FAILURE if alert else AuditOutcome.MINOR_FAILURE,
            actor=key.split(":", 1)[-1][:200] if key.startswith("member:") else "unknown",
            source=source,
            detail=f"{detail}: throttled" if alert else detail,
        )
    )
    return count


# --------------------------------------------------------------------------- sessions


def open_session(
    session: Session, *, member_id: int | None = None, patient_share_id: int | None = None
) -> str:
    """Start a browser session; returns the cookie value (plaintext, once)."""
    token = secrets.token_urlsafe(32)
    session.add(
        WebSession(
            token_hash=hash_secret(token),
            member_id=member_id,
            patient_share_id=patient_share_id,
            csrf=secrets.token_urlsafe(32),
        )
    )
    return token


def load_session(session: Session, token: str | None, *, touch: bool = True) -> WebSession | None:
    """The live session of a cookie value; ends it when idle or too old."""
    if not token or len(token) > 100:
        return None
    row = session.scalar(select(WebSession).where(WebSession.token_hash == hash_secret(token)))
    if row is None or row.ended_at is not None:
        return None
    now = utcnow()
    if aware(row.last_seen) + IDLE < now or aware(row.created) + ABSOLUTE < now:
        row.ended_at = now
        return None
    if row.member_id is not None:
        member = session.get(Member, row.member_id)
        if member is None or not member.verified:
            row.ended_at = now
            return None
    if touch:
        row.last_seen = now
    return row


def end_session(session: Session, token: str | None) -> None:
    if token and len(token) <= 100:
        session.execute(
            update(WebSession)
            .where(WebSession.token_hash == hash_secret(token), WebSession.ended_at.is_(None))
            .values(ended_at=utcnow())
        )


def end_member_sessions(session: Session, member_id: int) -> None:
    """End every browser session and revoke every API token of a member (on disable)."""
    now = utcnow()
    session.execute(
        update(WebSession)
        .where(WebSession.member_id == member_id, WebSession.ended_at.is_(None))
        .values(ended_at=now)
    )
    session.execute(
        update(Token)
        .where(Token.member_id == member_id, Token.revoked_at.is_(None))
        .values(revoked_at=now)
    )


def principal_for(
    session: Session, member_id: int, *, web_session: WebSession | None = None
) -> Principal | None:
    """The member as a principal; with the browser ``web_session`` they came with, an
    administrator counts as one only once that session passed the second factor."""
    row = session.execute(
        select(Member, Facility)
        .join(Facility, Member.facility_id == Facility.id)
        .where(Member.id == member_id)
    ).first()
    if row is None:
        return None
    member, facility = row
    return Principal(
        member_id=member.id,
        facility=facility.address,
        email=member.email,
        role=member.role,
        verified=member.verified,
        confirmed=member.confirmed_at is not None,
        second_factor=web_session is None
        or member.role != "admin"
        or web_session.second_factor_at is not None,
    )


@hookimpl(trylast=True)
def emix_authenticate(request: Any) -> Principal | None:
    """The session cookie authenticates read-only requests (the viewer's DICOMweb reads)."""
    if request.method not in ("GET", "HEAD"):
        return None
    token = request.cookies.get(COOKIE)
    if not token:
        return None
    with _hub().db.session() as session:
        row = load_session(session, token)
        if row is None or row.member_id is None:
            return None
        return principal_for(session, row.member_id, web_session=row)
