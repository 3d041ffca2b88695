"""Account endpoints for facility admins and members: list members, rotate a token.

Adding and removing members and revoking the current token live in
:mod:`emix_core.hub.api_facilities`. Every call is authorized deny-by-default and audited.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, request
from sqlalchemy import select

from emix_core.hub.auth import audit_request, hash_secret, issue_token, require
from emix_core.model import AuditAction, utcnow
from emix_core.store.db import Facility, Member, Token

bp = Blueprint("accounts", __name__, url_prefix="/api/v1")


def _hub():  # type: ignore[no-untyped-def]
    return current_app.extensions["emix"]


@bp.get("/members")
def list_members() -> Response:
    """The members of the caller's facility (admins only)."""
    from emix_core.hub.auth import current_principal

    principal = require("member:list", current_principal().facility)
    with _hub().db.session() as session:
        facility = session.scalar(select(Facility).where(Facility.address == principal.facility))
        rows = session.scalars(
            select(Member).where(Member.facility_id == facility.id).order_by(Member.email)
        ).all()
        members = [
            {
                "id": m.id,
                "email": m.email,
                "role": m.role,
                "confirmed": m.confirmed_at is not None,
                "active": bool(m.verified),
            }
            for m in rows
        ]
    audit_request(
        "query",
        action=AuditAction.READ,
        actor=principal.email,
        detail=f"members of facility {principal.facility} listed",
    )
    return jsonify({"members": members})


@bp.post("/tokens/current/rotate")
def rotate_current() -> Response:
    """A new token for the caller; the one this request was made with is revoked."""
    from emix_core.hub.auth import current_principal

    principal = require("token:rotate", current_principal().email)
    old = request.headers.get("Authorization", "").partition(" ")[2]
    hub = _hub()
    with hub.db.session() as session:
        row = session.scalar(select(Token).where(Token.token_hash == hash_secret(old)))
        member = session.get(Member, principal.member_id)
        row.revoked_at = utcnow()
        token = issue_token(session, member, days=hub.config.hub.token_days, label="rotated")
    audit_request(
        "user-authentication",
        action=AuditAction.UPDATE,
        actor=principal.email,
        detail="token rotated; the previous one is revoked",
    )
    return jsonify({"token": token, "email": principal.email})
