"""Built-in security plugin: bearer-token authentication and deny-by-default authorization.

Registered as ``emix.tokens``. Tokens are random, shown once, stored as SHA-256,
expire and can be revoked. A package addressed to a facility is visible to that
facility's verified, confirmed members; one addressed to a member, to that member and
the facility's admins. Everyone else gets 404, never 403.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta
from typing import Any

from flask import current_app, g, request
from sqlalchemy import select

from emix_core.errors import AuthenticationError, NotFoundError
from emix_core.hub.throttle import record_failure
from emix_core.model import AuditAction, AuditEvent, AuditOutcome, Package, Principal, utcnow
from emix_core.plugins import hookimpl, hooks_for
from emix_core.store.db import Facility, Member, Token

TOKEN_PREFIX = "emx_"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def issue_token(session: Any, member: Member, *, days: int, label: str = "") -> str:
    """Create a token for a member; the plaintext is returned once and never stored."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(
        Token(
            member_id=member.id,
            token_hash=hash_secret(token),
            label=label,
            expires=utcnow() + timedelta(days=days),
        )
    )
    return token


def _hub():  # type: ignore[no-untyped-def]
    return current_app.extensions["emix"]


@hookimpl(trylast=True)
def emix_authenticate(request: Any) -> Principal | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    hub = _hub()
    with hub.db.session() as session:
        row = session.execute(
            select(Token, Member, Facility)
            .join(Member, Token.member_id == Member.id)
            .join(Facility, Member.facility_id == Facility.id)
            .where(Token.token_hash == hash_secret(token))
        ).first()
        if row is None:
            return None
        tok, member, facility = row
        expires = tok.expires if tok.expires.tzinfo else tok.expires.replace(tzinfo=utcnow().tzinfo)
        if tok.revoked_at is not None or expires < utcnow():
            return None
        return Principal(
            member_id=member.id,
            facility=facility.address,
            email=member.email,
            role=member.role,
            verified=member.verified,
            confirmed=member.confirmed_at is not None,
        )


@hookimpl(trylast=True)
def emix_authorize(principal: Principal, action: str, resource: Any) -> bool | None:
    if not (principal.verified and principal.confirmed):
        return False
    if action in ("package:create", "inbox:list", "facility:key"):
        return True
    if action == "token:rotate":
        return resource == principal.email
    if action in ("member:add", "member:list", "audit:read", "token:revoke", "facility:key:first"):
        # a browser session of an administrator acts as one only after the second factor
        return principal.is_admin and principal.second_factor and resource == principal.facility
    if isinstance(resource, Package):
        is_sender = resource.sender == principal.facility
        if action == "package:write":
            return is_sender
        if action == "package:status":
            return is_sender or _is_recipient(principal, resource)
        if action in ("package:read", "package:receipt"):
            return _is_recipient(principal, resource)
    return None


def _is_recipient(principal: Principal, package: Package) -> bool:
    for recipient in package.recipients:
        if recipient.facility != principal.facility:
            continue
        if recipient.email is None or recipient.email == principal.email:
            return True
        # reading a colleague's package is an administrator's right: a browser session
        # has it only once it passed the second factor
        if principal.is_admin and principal.second_factor:
            return True
    return False


def is_allowed(principal: Principal, action: str, resource: Any) -> bool:
    """Deny by default: any ``False`` denies and at least one ``True`` is needed."""
    return hooks_for(_hub().pm).authorize(principal, action, resource)


def require(action: str, resource: Any) -> Principal:
    """Return the caller, or raise 404 (never 403) unless it may act on the resource."""
    principal = current_principal()
    if not is_allowed(principal, action, resource):
        audit_request(  # a denied access is evidence too (a probe of other facilities)
            "security-alert",
            action=AuditAction.READ,
            actor=principal.email,
            detail=f"access denied: {action} by facility {principal.facility}",
            package_id=getattr(resource, "id", None) if isinstance(resource, Package) else None,
            outcome=AuditOutcome.MINOR_FAILURE,
        )
        raise NotFoundError("not found")
    return principal


def client_source() -> str:
    return (request.remote_addr or "unknown")[:64]


def audit_request(
    event_type: str,
    *,
    action: AuditAction,
    actor: str,
    detail: str,
    package_id: str | None = None,
    phi: dict[str, Any] | None = None,
    outcome: AuditOutcome = AuditOutcome.SUCCESS,
) -> None:
    """Record an audit event about the current request, from the caller's address."""
    _hub().audit(
        AuditEvent(
            event_type=event_type,
            action=action,
            outcome=outcome,
            actor=actor,
            source=client_source(),
            package_id=package_id,
            phi=phi or {},
            detail=detail,
        )
    )


def current_principal() -> Principal:
    """The authenticated caller of this request: 401 if there is none, 429 once the
    client or the credential failed too often (a valid token is never refused)."""
    if "principal" in g:
        return g.principal
    hub = _hub()
    principal = hooks_for(hub.pm).authenticate(request)
    if principal is None:
        presented = request.headers.get("Authorization", "")[:300]
        record_failure(hub, client_source(), presented, "sign-in")
        raise AuthenticationError("authentication required")
    g.principal = principal
    return principal
