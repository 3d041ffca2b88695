"""``/api/v1/packages`` and ``/api/v1/inbox``: the exchange itself."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any, BinaryIO, cast

from flask import Blueprint, Response, current_app, jsonify, request, stream_with_context
from sqlalchemy import select
from sqlalchemy.orm import Session

from emix_core import crypto, frames
from emix_core.content.archive import package_zip
from emix_core.content.manifest_parts import check_chain_head
from emix_core.content.manifest_rules import MEDIA_TYPE_RE
from emix_core.errors import (
    ConflictError,
    IntegrityError,
    InvalidInput,
    NotFoundError,
    PayloadTooLarge,
)
from emix_core.hub import api_progressive
from emix_core.hub import packages as svc
from emix_core.hub.auth import audit_request, current_principal, is_allowed, require
from emix_core.hub.sessions import package_link
from emix_core.model import AuditAction, AuditOutcome, Recipient, utcnow
from emix_core.plugins import hooks_for
from emix_core.store.db import Facility, ItemRow, Member, PackageRecipient, PackageRow

bp = Blueprint("packages", __name__, url_prefix="/api/v1")


def _hub():  # type: ignore[no-untyped-def]
    return current_app.extensions["emix"]


def json_body() -> dict[str, Any]:
    """The request's JSON object, size-limited."""
    limit = _hub().config.hub.max_json_bytes
    if (request.content_length or 0) > limit:
        raise PayloadTooLarge(f"JSON body larger than {limit} bytes")
    try:
        data = request.get_json(silent=True, force=True)
        # lone surrogates decode but cannot be stored or hashed: refuse them here
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except (RecursionError, UnicodeError) as exc:
        raise InvalidInput("request body is not acceptable JSON (too deep or not UTF-8)") from exc
    if not isinstance(data, dict):
        raise InvalidInput("request body must be a JSON object")
    return data


def checked_media_type(value: str) -> str:
    """A plain ``type/subtype`` (parameters dropped); anything else is refused."""
    media_type = value.split(";")[0].strip().lower()
    if not MEDIA_TYPE_RE.fullmatch(media_type):
        raise InvalidInput("Content-Type must be a plain type/subtype such as application/pdf")
    return media_type


@bp.post("/packages")
def create() -> tuple[Response, int]:
    principal = require("package:create", None)
    data = json_body()
    to = data.get("to")
    if isinstance(to, str):
        to = [to]
    if not isinstance(to, list):
        raise InvalidInput("'to' must list recipient facility addresses or member emails")
    expires_days = data.get("expires_days")
    if expires_days is not None and not isinstance(expires_days, int):
        raise InvalidInput("'expires_days' must be an integer")
    hub = _hub()
    with hub.db.session() as session:
        member = session.get(Member, principal.member_id)
        row, resolved = svc.create_package(hub, session, member, to, expires_days)
        body = {
            "id": row.id,
            "state": row.state,
            "expires": row.expires.isoformat(),
            # whom each address resolved to, so the sender sees where the package goes
            "recipients": resolved,
        }
    audit_request(
        "begin-transferring",
        action=AuditAction.CREATE,
        actor=principal.email,
        detail=f"package opened for {len(to)} recipient(s)",
        package_id=row.id,
    )
    return jsonify(body), 201


def _writable(package_id: str) -> PackageRow:
    hub = _hub()
    current_principal()  # authenticate first: unknown and missing packages answer alike
    with hub.db.session() as session:
        row, package = svc.load_package(session, package_id)
    require("package:write", package)
    if row.state != "open":
        raise ConflictError("package is already sealed; create a new package")
    return row


@bp.put("/packages/<package_id>/items/<int:item_id>")
def upload_item(package_id: str, item_id: int) -> tuple[Response, int]:
    """One item, streamed; ``X-Emix-SHA256`` declares its digest."""
    hub = _hub()
    row = _writable(package_id)
    size = request.content_length
    if size is None:
        raise InvalidInput("Content-Length is required for item uploads")
    with hub.db.session() as session:
        svc.check_item_size(hub, size, svc.stored_bytes(session, row.id))
    sha256 = request.headers.get("X-Emix-SHA256", "").lower()
    media_type = checked_media_type(request.content_type or "application/octet-stream")
    body = cast(BinaryIO, request.stream)
    writer = svc.store_item(hub, row, item_id, body, size=size, sha256=sha256)
    item = ItemRow(
        package_id=row.id, item_id=item_id, size=size, sha256=sha256, media_type=media_type
    )
    svc.commit_items(hub, row.id, [(writer, item)])
    return jsonify({"package": row.id, "item": item_id, "stored": True}), 201


@bp.post("/packages/<package_id>/items")
def upload_batch(package_id: str) -> tuple[Response, int]:
    """Many items in one streamed body (:mod:`emix_core.frames`); each digest follows its bytes.

    Items whose bytes do not match their digest are listed as failed and not stored;
    the rest of the batch is.
    """
    hub = _hub()
    row = _writable(package_id)
    if (request.content_type or "").split(";")[0] != frames.MEDIA_TYPE:
        raise InvalidInput(f"batch uploads must be sent as {frames.MEDIA_TYPE}")
    stream = cast(BinaryIO, request.stream)
    stored: list[tuple[Any, ItemRow]] = []
    failed: list[dict[str, Any]] = []
    with hub.db.session() as session:
        package_bytes = svc.stored_bytes(session, row.id)
    buffer = memoryview(bytearray(crypto.SEGMENT_SIZE))  # one for the batch's items
    try:
        while (header := frames.read_header(stream)) is not None:
            svc.check_item_size(hub, header.size, package_bytes)
            checked_media_type(header.media_type)
            digest, writer = svc.write_item(
                hub, row, header.id, stream, size=header.size, buffer=buffer
            )
            declared = frames.read_exactly(stream, frames.DIGEST_SIZE)
            if declared.hex() != digest:
                writer.abort()
                failed.append(
                    {
                        "id": header.id,
                        "error": "bytes do not match their SHA-256; "
                        "not stored, send the item again",
                    }
                )
                continue
            package_bytes += header.size
            item = ItemRow(
                package_id=row.id,
                item_id=header.id,
                size=header.size,
                sha256=digest,
                media_type=header.media_type,
            )
            stored.append((writer, item))
    finally:  # what was stored before an error stays recorded, durably
        svc.commit_items(hub, row.id, stored)
    return jsonify({"stored": [i.item_id for _, i in stored], "failed": failed}), 201


@bp.post("/packages/<package_id>/seal")
def seal(package_id: str) -> Response:
    hub = _hub()
    current_principal()
    signed = json_body()
    with hub.db.session() as session:
        svc.lock_package(session, package_id)  # two instances never seal it twice
        row, package = svc.load_package(session, package_id)
        require("package:write", package)
        if row.state != "open":
            raise ConflictError("package is already sealed")
    try:
        with hub.db.session() as session:
            svc.lock_open_package(session, package_id)  # no upload commits while we check
            row, package = svc.load_package(session, package_id)
            principal = require("package:write", package)
            facility = session.get(Facility, row.sender_facility_id)
            if not facility.signing_key:
                raise ConflictError(
                    "the sending facility has no registered signing key; register it first"
                )
            document = crypto.verify_document(signed, facility.signing_key)
            items = svc.check_manifest(session, row, package, document)
            check_chain_head(document, *api_progressive.chain_head(hub, row))
            svc.put_small_blob(hub, row, svc.MANIFEST_BLOB, crypto.canonical_json(signed))
            studies = document.get("studies", [])
            row.summary = svc.seal_summary(hub, row, {"studies": studies})
            row.item_count = len(items)
            row.total_size = sum(i.size for i in items)
            row.state = "sealed"
            row.sealed_at = utcnow()
            package.items = items
            package.state = "sealed"
            package.studies = studies
            recipients = [
                (recipient, email, package_link(hub, session, facility_id, email, row.id))
                for recipient, email, facility_id in _notify_addresses(session, row.id)
            ]
    except Exception as exc:  # a refused or failed seal is on the record too
        audit_request(
            "instances-transferred",
            action=AuditAction.CREATE,
            actor=principal_of_request(),
            detail=f"seal refused or failed: {getattr(exc, 'message', type(exc).__name__)}"[:300],
            package_id=package_id,
            outcome=AuditOutcome.SERIOUS_FAILURE
            if not isinstance(exc, InvalidInput | IntegrityError)
            else AuditOutcome.MINOR_FAILURE,
        )
        raise
    phi = {"studies": [s.get("study_uid") for s in studies]}
    audit_request(
        "instances-transferred",
        action=AuditAction.CREATE,
        actor=principal.email,
        detail=f"package sealed: {len(items)} items stored",
        package_id=row.id,
        phi=phi,
    )
    # Notifications: a plugin that fails is logged and never undoes the seal.
    hooks = hooks_for(hub.pm)
    hooks.package_sealed(package)
    for recipient, email, link in recipients:
        if not svc.claim_notice(hub, row.id, email):
            continue  # another instance (or an earlier try) notifies this one
        if not hooks.notify(recipient, email, package, link):
            current_app.logger.error("no notification sent for package %s", row.id)
    checkpoint = hub.audit_log.checkpoint()
    return jsonify({"id": row.id, "state": "sealed", "checkpoint": checkpoint})


def principal_of_request() -> str:
    from flask import g

    return g.principal.email if "principal" in g else "unknown"


def _notify_addresses(session: Session, package_id: str) -> list[tuple[Recipient, str, int]]:
    """Who to mail: the addressed member, or the admin of an addressed facility."""
    out = []
    for rec in session.scalars(
        select(PackageRecipient).where(PackageRecipient.package_id == package_id)
    ):
        facility = session.get(Facility, rec.facility_id)
        assert facility is not None  # a recipient row references its facility
        if rec.member_id:
            member = session.get(Member, rec.member_id)
            assert member is not None
            out.append((Recipient(facility.address, member.email), member.email, facility.id))
        else:
            out.append((Recipient(facility.address), facility.admin_email, facility.id))
    return out


@bp.get("/inbox")
def inbox() -> Response:
    principal = current_principal()
    hub = _hub()
    now = utcnow()
    listing = []
    with hub.db.session() as session:
        facility = session.scalar(select(Facility).where(Facility.address == principal.facility))
        # open packages only for a client that asks (a receiving gateway that opted in)
        states = ("sealed", "open") if request.args.get("progressive") == "1" else ("sealed",)
        rows = session.scalars(
            select(PackageRow)
            .join(PackageRecipient, PackageRecipient.package_id == PackageRow.id)
            .where(PackageRecipient.facility_id == facility.id, PackageRow.state.in_(states))
            .order_by(PackageRow.sealed_at.desc())
            .distinct()
        ).all()
        for row in rows:
            if row.state == "open" and not row.item_count:
                continue  # no part yet: nothing to take before the seal
            _, package = svc.load_package(session, row.id)
            expires = row.expires if row.expires.tzinfo else row.expires.replace(tzinfo=now.tzinfo)
            if expires < now:
                continue
            if not is_allowed(principal, "package:read", package):
                continue
            try:
                summary = svc.open_summary(hub, row)
            except IntegrityError:  # its key does not unwrap: skip it, the others stay listed
                audit_request(
                    "security-alert",
                    action=AuditAction.READ,
                    actor=principal.email,
                    detail="inbox: a package key does not unwrap; package skipped",
                    package_id=row.id,
                    outcome=AuditOutcome.SERIOUS_FAILURE,
                )
                continue
            delivered = session.scalar(
                select(PackageRecipient.delivered_at).where(
                    PackageRecipient.package_id == row.id,
                    PackageRecipient.facility_id == facility.id,
                )
            )
            listing.append(
                {
                    "id": row.id,
                    "state": row.state,
                    "from": package.sender,
                    "to": [str(r) for r in package.recipients],
                    "created": row.created.isoformat(),
                    "sealed": row.sealed_at.isoformat() if row.sealed_at else None,
                    "expires": row.expires.isoformat(),
                    "items": row.item_count,
                    "size": row.total_size,
                    "delivered": delivered.isoformat() if delivered else None,
                    "studies": summary.get("studies", []),
                }
            )
    audit_request(
        "query",
        action=AuditAction.EXECUTE,
        actor=principal.email,
        detail=f"inbox listed ({len(listing)} packages)",
        phi={
            "packages": [p["id"] for p in listing],
            "patients": sorted(
                {str(s.get("patient_id") or "") for p in listing for s in p["studies"]} - {""}
            ),
        },
    )
    return jsonify({"packages": listing})


@bp.get("/packages/<package_id>")
def status(package_id: str) -> Response:
    hub = _hub()
    current_principal()
    with hub.db.session() as session:
        row, package = svc.load_package(session, package_id)
        require("package:status", package)
        recipients = [
            {
                "facility": session.get(Facility, rec.facility_id).address,
                "delivered": rec.delivered_at.isoformat() if rec.delivered_at else None,
            }
            for rec in session.scalars(
                select(PackageRecipient).where(PackageRecipient.package_id == row.id)
            )
        ]
    return jsonify(
        {
            "id": row.id,
            "from": package.sender,
            "state": row.state,
            "items": row.item_count,
            "size": row.total_size,
            "created": row.created.isoformat(),
            "expires": row.expires.isoformat(),
            "recipients": recipients,
        }
    )


def _readable(  # type: ignore[no-untyped-def]
    package_id: str, action: str = "package:read", *, open_too: bool = False
):
    """The package for a recipient: sealed (or, with ``open_too``, still open) and not
    expired; 404 otherwise."""
    hub = _hub()
    current_principal()  # authenticate first: unknown and missing packages answer alike
    with hub.db.session() as session:
        row, package = svc.load_package(session, package_id)
    principal = require(action, package)
    expires = row.expires if row.expires.tzinfo else row.expires.replace(tzinfo=utcnow().tzinfo)
    states = ("sealed", "open") if open_too else ("sealed",)
    if row.state not in states or expires < utcnow():  # expired: gone, before the purge runs
        raise NotFoundError("not found")
    return hub, row, package, principal


@bp.get("/packages/<package_id>/manifest")
def manifest(package_id: str) -> Response:
    hub, row, _package, principal = _readable(package_id)
    data = b"".join(svc.read_item(hub, row, svc.MANIFEST_BLOB))
    audit_request(
        "instances-accessed",
        action=AuditAction.READ,
        actor=principal.email,
        detail="manifest read",
        package_id=row.id,
    )
    return Response(data, mimetype="application/json")


def _item_stream(hub, row, item_id) -> Any:  # type: ignore[no-untyped-def]
    """Start decrypting before answering, so a tampered first segment gives a 422."""
    stream = svc.read_item(hub, row, item_id)
    first = next(stream, b"")

    def generate():  # type: ignore[no-untyped-def]
        yield first
        yield from stream

    return generate()


@bp.get("/packages/<package_id>/items/<int:item_id>")
def download_item(package_id: str, item_id: int) -> Response:
    hub, row, _package, principal = _readable(package_id)
    if not 1 <= item_id <= svc.MAX_ITEMS:
        raise NotFoundError("not found")
    with hub.db.session() as session:
        item = session.get(ItemRow, (row.id, item_id))
    if item is None:
        raise NotFoundError("not found")
    body = _item_stream(hub, row, item_id)
    audit_request(
        "instances-transferred",
        action=AuditAction.READ,
        actor=principal.email,
        detail=f"item {item_id} downloaded",
        package_id=row.id,
    )
    response = Response(stream_with_context(body), mimetype=item.media_type)
    response.headers["Content-Length"] = str(item.size)
    response.headers["X-Emix-SHA256"] = item.sha256
    return response


@bp.get("/packages/<package_id>/stream")
def download_batch(package_id: str) -> Response:
    """Items ``first``..``last`` (by id) in one stream of frames (:mod:`emix_core.frames`).

    One request for many items, as uploads do; each item's SHA-256 follows its bytes.
    A stored item that fails authentication cuts the stream: nothing altered is sent.
    """
    hub, row, _package, principal = _readable(package_id, open_too=True)
    first = request.args.get("first", type=int)
    last = request.args.get("last", type=int)
    if first is None or last is None or not 1 <= first <= last <= svc.MAX_ITEMS:
        raise InvalidInput("give ?first=N&last=M, the range of item ids to fetch")
    with hub.db.session() as session:
        items = session.scalars(
            select(ItemRow)
            .where(ItemRow.package_id == row.id, ItemRow.item_id.between(first, last))
            .order_by(ItemRow.item_id)
        ).all()
    if row.state == "open":  # before the seal: only items a signed part lists
        signed = api_progressive.items_in_parts(hub, row, request.args.get("part", type=int))
        if any(i.item_id not in signed for i in items):
            raise NotFoundError("not found")

    def generate() -> Iterator[bytes]:
        try:
            for item in items:
                yield frames.encode_header(item.item_id, item.size, item.media_type)
                digest = hashlib.sha256()
                for chunk in svc.read_item(hub, row, item.item_id):
                    digest.update(chunk)
                    yield chunk
                yield digest.digest()
            yield frames.END_MAGIC
        except Exception as exc:  # the stream is cut: say so in the audit trail
            integrity = isinstance(exc, IntegrityError)
            audit_request(
                "instances-transferred",
                action=AuditAction.READ,
                actor=principal.email,
                detail=f"items {first}-{last}: stream cut"
                + (" (stored bytes failed authentication)" if integrity else ""),
                package_id=row.id,
                outcome=AuditOutcome.SERIOUS_FAILURE,
            )
            raise
        audit_request(
            "instances-transferred",
            action=AuditAction.READ,
            actor=principal.email,
            detail=f"items {first}-{last} downloaded ({len(items)} items)",
            package_id=row.id,
        )

    response = Response(stream_with_context(generate()), mimetype=frames.MEDIA_TYPE)
    response.headers["Content-Length"] = str(
        sum(frames.frame_size(i.item_id, i.size, i.media_type) for i in items)
        + len(frames.END_MAGIC)
    )
    return response


@bp.get("/packages/<package_id>/zip")
def download_zip(package_id: str) -> Response:
    """The whole package as one zip (entries stored, Zip64), streamed."""
    hub, row, _package, principal = _readable(package_id)
    signed = json.loads(b"".join(svc.read_item(hub, row, svc.MANIFEST_BLOB)))
    archive = package_zip(signed, lambda item: svc.read_item(hub, row, item.id))
    items = signed["document"]["items"]
    audit_request(
        "instances-transferred",
        action=AuditAction.READ,
        actor=principal.email,
        detail=f"zip of {len(items)} items downloaded",
        package_id=row.id,
    )
    response = Response(stream_with_context(archive), mimetype="application/zip")
    response.headers["Content-Length"] = str(len(archive))
    response.headers["Content-Disposition"] = f'attachment; filename="emix-{row.id}.zip"'
    return response


@bp.post("/packages/<package_id>/receipt")
def receipt(package_id: str) -> Response:
    hub, row, package, principal = _readable(package_id, "package:receipt")
    signed = json_body()
    with hub.db.session() as session:
        facility = session.scalar(select(Facility).where(Facility.address == principal.facility))
        if not facility.signing_key:
            raise ConflictError("register your facility's signing key before posting receipts")
        document = crypto.verify_document(signed, facility.signing_key)
        if document.get("format") != svc.RECEIPT_FORMAT or document.get("package") != row.id:
            raise IntegrityError("receipt does not belong to this package")
        if (document.get("recipient"), document.get("member")) != (
            principal.facility,
            principal.email,
        ):
            raise InvalidInput("a receipt names the facility and member posting it")
        _check_receipt_time(document.get("received"))
        stored = {
            i.item_id: i.sha256
            for i in session.scalars(select(ItemRow).where(ItemRow.package_id == row.id))
        }
        try:
            got = {int(i["id"]): str(i["sha256"]) for i in document.get("items", [])}
        except (TypeError, KeyError, ValueError) as exc:
            raise InvalidInput("receipt items must be {id, sha256} objects") from exc
        complete = got == stored
        kept = False
        for rec in session.scalars(
            select(PackageRecipient).where(
                PackageRecipient.package_id == row.id,
                PackageRecipient.facility_id == facility.id,
            )
        ):
            if rec.receipt is None:  # the first receipt stays; later ones are only audited
                rec.delivered_at = utcnow()
                rec.receipt = json.dumps(signed)
                kept = True
    audit_request(
        "instances-transferred",
        action=AuditAction.READ,
        actor=principal.email,
        detail=("receipt: complete" if complete else "receipt: items differ")
        + ("" if kept else " (a receipt was stored before; kept that one)"),
        package_id=row.id,
        outcome=AuditOutcome.SUCCESS if complete else AuditOutcome.MINOR_FAILURE,
    )
    return jsonify(
        {"id": row.id, "receipt": "stored" if kept else "kept-first", "complete": complete}
    )


def _check_receipt_time(value: Any) -> None:
    """A receipt is dated now (within clock skew), never back- or forward-dated."""
    from datetime import datetime, timedelta

    try:
        when = datetime.fromisoformat(str(value))
    except ValueError as exc:
        raise InvalidInput("receipt 'received' must be an ISO 8601 time") from exc
    if when.tzinfo is None or abs(when - utcnow()) > timedelta(minutes=10):
        raise InvalidInput("receipt 'received' must be the current time (check the clock)")
