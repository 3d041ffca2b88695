"""Hub operator tasks on facilities, done on the hub's home (not over the API)."""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from sqlalchemy import select

from emix_core.errors import ConflictError, InvalidInput, NotFoundError
from emix_core.hub.api_facilities import EMAIL_RE
from emix_core.hub.auth import issue_token
from emix_core.hub.context import Hub
from emix_core.model import AuditAction, is_valid_address, utcnow
from emix_core.reports.convert import report_formats
from emix_core.store.db import Facility, Member


def slugify(name: str) -> str:
    """``"St. Mary's Hospital"`` → ``"st-marys-hospital"``."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower().replace("'", "")).strip("-")
    return slug[:63].strip("-")


def add_facility(
    hub: Hub,
    name: str,
    admin_email: str,
    *,
    address: str | None = None,
    report_format: str = "pdf",
    max_retention_days: int | None = None,
) -> dict[str, Any]:
    """Create a facility and its verified admin; return ``{"id", "address", "token"}``."""
    address = address or slugify(name)
    if not is_valid_address(address):
        raise InvalidInput(
            "facility address must be a lowercase slug (a-z, 0-9, -), not 'hub'; pass --address"
        )
    email = admin_email.strip().lower()
    if not EMAIL_RE.match(email):
        raise InvalidInput("give the facility admin's email address with --email")
    formats = report_formats(hub.pm)
    if report_format not in formats:
        raise InvalidInput(f"report format must be one of {', '.join(formats)}")
    with hub.db.session() as session:
        if session.scalar(select(Facility).where(Facility.address == address)):
            raise ConflictError(f"a facility with address {address!r} exists already")
        if session.scalar(
            select(Member).where(Member.email == email, Member.confirmed_at.is_not(None))
        ):
            raise ConflictError("that email is already a member of a facility on this hub")
        facility = Facility(
            address=address,
            name=name,
            admin_email=email,
            report_format=report_format,
            max_retention_days=max_retention_days or hub.config.hub.default_retention_days,
        )
        session.add(facility)
        session.flush()
        admin = Member(
            facility_id=facility.id, email=email, role="admin", verified=True, confirmed_at=utcnow()
        )
        session.add(admin)
        session.flush()
        token = issue_token(session, admin, days=hub.config.hub.token_days, label="admin")
        facility_id = facility.id
    hub.audit_operator(AuditAction.CREATE, f"facility {address} added")
    return {"id": facility_id, "address": address, "token": token}


def list_facilities(hub: Hub) -> list[dict[str, Any]]:
    with hub.db.session() as session:
        return [
            {
                "id": f.id,
                "address": f.address,
                "name": f.name,
                "admin_email": f.admin_email,
                "report_format": f.report_format,
                "key_registered": bool(f.signing_key),
            }
            for f in session.scalars(select(Facility).order_by(Facility.address))
        ]


def reset_key(hub: Hub, address: str) -> None:
    """Forget a facility's registered signing key (after it lost or rotated it)."""
    with hub.db.session() as session:
        facility = session.scalar(select(Facility).where(Facility.address == address))
        if facility is None:
            raise NotFoundError(f"no facility with address {address!r}")
        facility.signing_key = None
    hub.audit_operator(AuditAction.UPDATE, f"signing key of facility {address} reset")
