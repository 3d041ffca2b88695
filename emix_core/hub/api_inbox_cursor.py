"""``GET /api/v1/inbox/cursor``: a cheap fingerprint of a facility's inbox.

Gateways poll it every second or so and list the inbox (``/api/v1/inbox``, which decrypts
every summary and writes an audit row) only when the fingerprint changed. It reveals no
PHI and no package id, so it is not audited.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify
from sqlalchemy import distinct, func, select

from emix_core.hub.auth import require
from emix_core.store.db import Facility, PackageRecipient, PackageRow

bp = Blueprint("inbox_cursor", __name__, url_prefix="/api/v1")


@bp.get("/inbox/cursor")
def inbox_cursor() -> Response:
    principal = require("inbox:list", None)
    hub = current_app.extensions["emix"]
    with hub.db.session() as session:
        facility_id = session.scalar(
            select(Facility.id).where(Facility.address == principal.facility)
        )
        count, last = session.execute(
            select(func.count(distinct(PackageRow.id)), func.max(PackageRow.sealed_at))
            .join(PackageRecipient, PackageRecipient.package_id == PackageRow.id)
            .where(PackageRecipient.facility_id == facility_id, PackageRow.state == "sealed")
        ).one()
    return jsonify({"cursor": f"{count}:{last.isoformat() if last else ''}"})
