"""``GET /api/v1/inbox/cursor``: a cheap fingerprint of a facility's inbox.

Gateways ask for it every second or so and list the inbox (``/api/v1/inbox``, which
decrypts every summary and writes an audit row) only when the fingerprint changed. It
reveals no PHI and no package id, so it is not audited.

``?since=CURSOR&wait=S`` answers as soon as the fingerprint differs from ``since``, or
after ``S`` seconds (at most 10): a gateway learns of a new package at once instead of
at its next poll. ``?progressive=1`` also counts open packages that have manifest
parts, and the items those list (a receiving gateway that takes packages batch by batch).
"""

from __future__ import annotations

import time

from flask import Blueprint, Response, current_app, jsonify, request
from sqlalchemy import distinct, func, select

from emix_core.errors import InvalidInput
from emix_core.hub.auth import require
from emix_core.store.db import Facility, PackageRecipient, PackageRow

bp = Blueprint("inbox_cursor", __name__, url_prefix="/api/v1")

#: Longest wait of one request for a change (seconds), and how often it looks again.
MAX_WAIT = 10.0
WAIT_STEP = 0.05


def _cursor(hub, facility_id: int | None, progressive: bool) -> str:  # type: ignore[no-untyped-def]
    with hub.db.session() as session:
        count, last = session.execute(
            select(func.count(distinct(PackageRow.id)), func.max(PackageRow.sealed_at))
            .join(PackageRecipient, PackageRecipient.package_id == PackageRow.id)
            .where(PackageRecipient.facility_id == facility_id, PackageRow.state == "sealed")
        ).one()
        cursor = f"{count}:{last.isoformat() if last else ''}"
        if progressive:
            # open packages with parts: their count and the items their parts list so far
            opened, listed = session.execute(
                select(
                    func.count(distinct(PackageRow.id)),
                    func.coalesce(func.sum(PackageRow.item_count), 0),
                )
                .join(PackageRecipient, PackageRecipient.package_id == PackageRow.id)
                .where(
                    PackageRecipient.facility_id == facility_id,
                    PackageRow.state == "open",
                    PackageRow.item_count > 0,
                )
            ).one()
            cursor += f"/{opened}:{listed}"
    return cursor


@bp.get("/inbox/cursor")
def inbox_cursor() -> Response:
    principal = require("inbox:list", None)
    hub = current_app.extensions["emix"]
    progressive = request.args.get("progressive") == "1"
    since = request.args.get("since")
    try:
        wait = min(float(request.args.get("wait", "0")), MAX_WAIT)
    except ValueError as exc:
        raise InvalidInput("'wait' must be a number of seconds") from exc
    if not wait >= 0:
        raise InvalidInput("'wait' must be a number of seconds")
    with hub.db.session() as session:
        facility_id = session.scalar(
            select(Facility.id).where(Facility.address == principal.facility)
        )
    deadline = time.monotonic() + wait
    cursor = _cursor(hub, facility_id, progressive)
    while since is not None and cursor == since and time.monotonic() < deadline:
        time.sleep(WAIT_STEP)
        cursor = _cursor(hub, facility_id, progressive)
    return jsonify({"cursor": cursor})
