"""Progressive packages: signed manifest parts posted while the sender still uploads.

``POST /packages/<id>/parts`` (the sender) appends one signed part to an open package: the
hub checks its signature against the sending facility's registered key, its place in the
chain and that every item it lists is stored with exactly that size and SHA-256.

``GET /packages/<id>/parts?after=N&wait=S`` (a recipient) answers the parts after the
N-th and the package's state, waiting up to ``S`` seconds (at most 10) for one more part
or the seal: a receiving gateway learns of each batch as soon as it is signed.

A package that is not sealed stays invisible everywhere else: ``emix receive``, the web
inbox, mail notices and the plain inbox listing see it only once sealed. Only a client
that asks (``/inbox?progressive=1``, the receiving gateway's opt-in) lists open packages,
and only those with at least one part (``items`` and ``size``: what the parts list).
"""

from __future__ import annotations

import json
import time
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from sqlalchemy import select

from emix_core import crypto
from emix_core.content.manifest_parts import MAX_PARTS, check_part, part_hash
from emix_core.errors import ConflictError, IntegrityError, InvalidInput, NotFoundError
from emix_core.hub import packages as svc
from emix_core.hub.auth import audit_request, current_principal, require
from emix_core.hub.context import Hub
from emix_core.model import AuditAction, AuditOutcome, utcnow
from emix_core.store.db import Facility, ItemRow, PackageRow

bp = Blueprint("progressive", __name__, url_prefix="/api/v1")

#: Longest wait of one ``GET .../parts`` for a new part (seconds).
MAX_WAIT = 10.0
#: How often a waiting request looks again.
WAIT_STEP = 0.05


def _hub() -> Hub:
    return current_app.extensions["emix"]  # type: ignore[no-any-return]


def part_blob(number: int) -> str:
    return f"part-{number}"


def count_parts(hub: Hub, row: PackageRow) -> int:
    """How many parts the package holds (they are numbered from 1, without gaps)."""
    count = 0
    while count < MAX_PARTS and hub.blobs.exists(f"{row.id}/{part_blob(count + 1)}"):
        count += 1
    return count


def read_part(hub: Hub, row: PackageRow, number: int) -> dict[str, Any]:
    """Signed part ``number`` as the sender posted it."""
    return json.loads(b"".join(svc.read_item(hub, row, part_blob(number))))


def chain_head(hub: Hub, row: PackageRow) -> tuple[int, str]:
    """``(number of parts, hash of the last one)``; ``(0, "")`` for a package without parts."""
    count = count_parts(hub, row)
    return count, part_hash(read_part(hub, row, count)) if count else ""


def items_in_parts(hub: Hub, row: PackageRow, part: int | None = None) -> set[int]:
    """Ids of the items the posted parts (or only part ``part``) list: what a recipient
    may read before the seal."""
    if part is not None:
        numbers = (
            [part]
            if 1 <= part <= MAX_PARTS and hub.blobs.exists(f"{row.id}/{part_blob(part)}")
            else []
        )
    else:
        numbers = list(range(1, count_parts(hub, row) + 1))
    ids: set[int] = set()
    for number in numbers:
        for entry in read_part(hub, row, number)["document"]["items"]:
            ids.add(int(entry["id"]))
    return ids


@bp.post("/packages/<package_id>/parts")
def post_part(package_id: str) -> tuple[Response, int]:
    """Append a signed manifest part; its items must be stored already."""
    from emix_core.hub.api_packages import json_body

    hub = _hub()
    current_principal()
    signed = json_body()
    with hub.db.session() as session:
        row, package = svc.load_package(session, package_id)
        principal = require("package:write", package)
    try:
        with hub.db.session() as session:
            svc.lock_open_package(session, package_id)  # one part at a time, none after seal
            row, package = svc.load_package(session, package_id)
            facility = session.get(Facility, row.sender_facility_id)
            if facility is None or not facility.signing_key:
                raise ConflictError(
                    "the sending facility has no registered signing key; register it first"
                )
            number = count_parts(hub, row)
            last = read_part(hub, row, number) if number else None
            previous = part_hash(last) if last else ""
            if number >= MAX_PARTS:
                raise InvalidInput(f"a package holds at most {MAX_PARTS} manifest parts")
            document = crypto.verify_document(signed, facility.signing_key)
            items = check_part(
                document,
                package_id=row.id,
                sender=package.sender,
                number=number + 1,
                previous=previous,
            )
            stored = {
                r.item_id: r
                for r in session.scalars(
                    select(ItemRow).where(
                        ItemRow.package_id == row.id, ItemRow.item_id.in_([i.id for i in items])
                    )
                )
            }
            for item in items:
                kept = stored.get(item.id)
                if kept is None or (kept.sha256, kept.size) != (item.sha256, item.size):
                    raise IntegrityError(
                        "a manifest part lists an item the hub does not hold with that "
                        "size and SHA-256; upload it before posting its part"
                    )
            # ids grow from part to part: no item is listed twice, checked against one part
            floor = max((int(e["id"]) for e in last["document"]["items"]), default=0) if last else 0
            if min(i.id for i in items) <= floor:
                raise IntegrityError(
                    "a manifest part lists an item an earlier part listed (each part lists "
                    "items with higher ids than the part before)"
                )
            svc.put_small_blob(hub, row, part_blob(number + 1), crypto.canonical_json(signed))
            # what the parts list so far: shown by the progressive inbox, moves its cursor
            row.item_count = (row.item_count or 0) + len(items)
            row.total_size = (row.total_size or 0) + sum(i.size for i in items)
    except Exception as exc:
        audit_request(
            "security-alert" if isinstance(exc, IntegrityError) else "instances-transferred",
            action=AuditAction.CREATE,
            actor=principal.email,
            detail=f"manifest part refused: {getattr(exc, 'message', type(exc).__name__)}"[:300],
            package_id=package_id,
            outcome=AuditOutcome.MINOR_FAILURE,
        )
        raise
    audit_request(
        "instances-transferred",
        action=AuditAction.CREATE,
        actor=principal.email,
        detail=f"manifest part {number + 1} accepted: {len(items)} items",
        package_id=row.id,
        phi={"studies": sorted({i.study_uid for i in items if i.study_uid})},
    )
    return jsonify({"id": row.id, "part": number + 1, "chain": part_hash(signed)}), 201


def _wait_seconds() -> float:
    try:
        wait = float(request.args.get("wait", "0"))
    except ValueError as exc:
        raise InvalidInput("'wait' must be a number of seconds") from exc
    if not wait >= 0:  # also refuses NaN
        raise InvalidInput("'wait' must be a number of seconds")
    return min(wait, MAX_WAIT)


def _visible(hub: Hub, package_id: str) -> tuple[PackageRow, Any]:
    """The package, for a recipient, open or sealed and not expired; else 404."""
    with hub.db.session() as session:
        row, package = svc.load_package(session, package_id)
    principal = require("package:read", package)
    expires = row.expires if row.expires.tzinfo else row.expires.replace(tzinfo=utcnow().tzinfo)
    if row.state not in ("open", "sealed") or expires < utcnow():
        raise NotFoundError("not found")
    return row, principal


def _state(hub: Hub, package_id: str) -> str | None:
    with hub.db.session() as session:
        return session.scalar(select(PackageRow.state).where(PackageRow.id == package_id))


@bp.get("/packages/<package_id>/parts")
def list_parts(package_id: str) -> Response:
    """The parts after ``after`` and the package's state; waits for news up to ``wait`` s."""
    hub = _hub()
    current_principal()
    after = request.args.get("after", 0, type=int)
    if not 0 <= after <= MAX_PARTS:
        raise InvalidInput("'after' must be the number of parts already read")
    wait = _wait_seconds()
    deadline = time.monotonic() + wait
    row, principal = _visible(hub, package_id)
    count = count_parts(hub, row)
    # waiting looks only at the next part's blob and the state: cheap, 20 times a second
    while count <= after and row.state == "open" and time.monotonic() < deadline:
        time.sleep(WAIT_STEP)
        if hub.blobs.exists(f"{row.id}/{part_blob(count + 1)}") or _state(hub, row.id) != "open":
            row, principal = _visible(hub, package_id)  # and authorized again
            count = count_parts(hub, row)
    parts = [read_part(hub, row, n) for n in range(after + 1, count + 1)]
    if parts:
        audit_request(
            "instances-accessed",
            action=AuditAction.READ,
            actor=principal.email,
            detail=f"manifest parts {after + 1}-{count} read before the seal",
            package_id=row.id,
        )
    return jsonify({"id": row.id, "state": row.state, "parts": parts, "count": count})
