"""``/api/v1/facilities``, ``/api/v1/members``, ``/api/v1/me``: who is who on the hub."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime, timedelta

from flask import Blueprint, Response, current_app, jsonify
from sqlalchemy import select

from emix_core import crypto
from emix_core.errors import ConflictError, InvalidInput, NotFoundError
from emix_core.hub.api_packages import json_body
from emix_core.hub.auth import (
    audit_request,
    client_source,
    current_principal,
    hash_secret,
    is_allowed,
    issue_token,
    require,
)
from emix_core.hub.throttle import record_failure
from emix_core.model import AuditAction, utcnow
from emix_core.store.db import Facility, Member, Token

bp = Blueprint("facilities", __name__, url_prefix="/api/v1")
#: A mailed confirmation code works once, within this time.
CONFIRM_CODE_LIFETIME = timedelta(hours=72)
EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,190}$")


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _hub():  # type: ignore[no-untyped-def]
    return current_app.extensions["emix"]


@bp.get("/me")
def me() -> Response:
    p = current_principal()
    with _hub().db.session() as session:
        facility = session.scalar(select(Facility).where(Facility.address == p.facility))
        report_format = facility.report_format if facility else "pdf"
    return jsonify(
        {"facility": p.facility, "email": p.email, "role": p.role, "report_format": report_format}
    )


@bp.get("/hub")
def hub_info() -> Response:
    """Public facts about the hub: its audit-signing key, for checkpoint verification."""
    hub = _hub()
    return jsonify(
        {
            "audit_public_key": hub.signing_key.public_key_b64,
            "audit_key_fingerprint": hub.signing_key.fingerprint,
        }
    )


@bp.get("/facilities")
def list_facilities() -> Response:
    current_principal()
    with _hub().db.session() as session:
        rows = session.scalars(select(Facility).order_by(Facility.address)).all()
        return jsonify(
            {
                "facilities": [
                    {"address": f.address, "name": f.name, "report_format": f.report_format}
                    for f in rows
                ]
            }
        )


@bp.get("/facilities/<address>/key")
def facility_key(address: str) -> Response:
    current_principal()
    with _hub().db.session() as session:
        facility = session.scalar(select(Facility).where(Facility.address == address[:63]))
        if facility is None or not facility.signing_key:
            raise NotFoundError("that facility has no registered signing key")
        return jsonify(
            {
                "address": facility.address,
                "public_key": facility.signing_key,
                "fingerprint": crypto.fingerprint_of(facility.signing_key),
            }
        )


@bp.put("/facilities/me/key")
def register_key() -> tuple[Response, int]:
    """Register the facility's Ed25519 public key once; a different key is refused."""
    principal = require("facility:key", principal_facility := current_principal().facility)
    public_key = json_body().get("public_key")
    if not isinstance(public_key, str) or len(public_key) != 44:
        raise InvalidInput("public_key must be a base64 Ed25519 public key")
    crypto.fingerprint_of(public_key)
    hub = _hub()
    with hub.db.session() as session:
        facility = session.scalar(select(Facility).where(Facility.address == principal_facility))
        if facility.signing_key and facility.signing_key != public_key:
            raise ConflictError(
                "this facility already has a different signing key; a key change must be made "
                "by the hub operator (`emix hub facility reset-key`) and recipients re-pinned"
            )
        created = facility.signing_key is None
        if created and not is_allowed(principal, "facility:key:first", principal_facility):
            raise ConflictError(
                "your facility has no signing key yet; its admin registers it first "
                "(the admin's first `emix send` or `emix receive` does)"
            )
        facility.signing_key = public_key
    if created:
        audit_request(
            "security-alert",
            action=AuditAction.UPDATE,
            actor=principal.email,
            detail=f"signing key registered for facility {principal_facility}",
        )
    return jsonify({"fingerprint": crypto.fingerprint_of(public_key)}), 201 if created else 200


#: Letters and digits only: a code is typed after ``emix member confirm``, where one
#: starting with ``-`` would be read as an option (22 characters: 131 bits).
CODE_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def confirmation_code(length: int = 22) -> str:
    """A new member's confirmation code (mailed to them, typed on the command line)."""
    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(length))


@bp.post("/members")
def add_member() -> tuple[Response, int]:
    """A facility admin adds (and thereby verifies) a member; the member confirms by mail."""
    principal = require("member:add", current_principal().facility)
    data = json_body()
    email = str(data.get("email", "")).strip().lower()
    role = data.get("role", "member")
    if not EMAIL_RE.match(email) or role not in ("member", "admin"):
        raise InvalidInput("give a valid email and a role of 'member' or 'admin'")
    hub = _hub()
    code = confirmation_code()
    with hub.db.session() as session:
        facility = session.scalar(select(Facility).where(Facility.address == principal.facility))
        # Another facility may have typed the same address in; only a confirmation
        # proves it, so that never blocks the facility the address really belongs to.
        if session.scalar(
            select(Member).where(Member.email == email, Member.facility_id == facility.id)
        ):
            raise ConflictError("a member with that email already exists in your facility")
        member = Member(
            facility_id=facility.id,
            email=email,
            role=role,
            verified=True,
            confirm_code_hash=hash_secret(code),
        )
        session.add(member)
        session.flush()
        member_id = member.id
    from emix_core.hub.notify import send_confirmation

    send_confirmation(hub, email, code)
    audit_request(
        "security-alert",
        action=AuditAction.CREATE,
        actor=principal.email,
        detail=f"member added to facility {principal.facility}",
    )
    return jsonify({"id": member_id, "email": email, "role": role, "confirmed": False}), 201


@bp.post("/members/confirm")
def confirm_member() -> Response:
    """New-recipient confirmation: the emailed code is exchanged for an API token once."""
    hub = _hub()
    code = str(json_body().get("code", ""))[:100]
    with hub.db.session() as session:
        member = session.scalar(select(Member).where(Member.confirm_code_hash == hash_secret(code)))
        if (
            member is None
            or not code
            or not member.verified  # removed before confirming
            or _aware(member.created) < utcnow() - CONFIRM_CODE_LIFETIME
        ):
            member = None
        else:
            member.confirmed_at = utcnow()
            member.confirm_code_hash = None
            token = issue_token(session, member, days=hub.config.hub.token_days, label="confirmed")
            email = member.email
    if member is None:
        record_failure(hub, client_source(), code, "confirmation code")
        raise NotFoundError("unknown or already used confirmation code")
    audit_request(
        "user-authentication",
        action=AuditAction.EXECUTE,
        actor=email,
        detail="new recipient confirmed identity",
    )
    return jsonify({"token": token, "email": email})


@bp.delete("/members/<int:member_id>")
def remove_member(member_id: int) -> Response:
    principal = require("member:add", current_principal().facility)
    hub = _hub()
    with hub.db.session() as session:
        member = session.get(Member, member_id)
        facility = session.scalar(select(Facility).where(Facility.address == principal.facility))
        if member is None or member.facility_id != facility.id:
            raise NotFoundError("not found")
        member.verified = False
        removed = member.email
        for token in session.scalars(select(Token).where(Token.member_id == member.id)):
            token.revoked_at = utcnow()
    audit_request(
        "security-alert",
        action=AuditAction.DELETE,
        actor=principal.email,
        detail=f"member {removed} removed from facility {principal.facility}; tokens revoked",
    )
    return jsonify({"id": member_id, "removed": True})


@bp.delete("/tokens/current")
def revoke_current() -> Response:
    """Revoke the token this request was made with."""
    from flask import request

    principal = current_principal()
    token = request.headers.get("Authorization", "").partition(" ")[2]
    with _hub().db.session() as session:
        row = session.scalar(select(Token).where(Token.token_hash == hash_secret(token)))
        row.revoked_at = utcnow()
    audit_request(
        "user-authentication",
        action=AuditAction.EXECUTE,
        actor=principal.email,
        detail="token revoked",
    )
    return jsonify({"revoked": True})
