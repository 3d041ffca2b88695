"""Open packages, for their sender: what is stored already (to resume), and abort.

``GET /packages/<id>/uploaded`` lists the items the hub holds for an open package;
``DELETE /packages/<id>`` aborts an open package and deletes its blobs. Both answer 404
to anyone but the sending facility and for a package that is not open.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify
from sqlalchemy import select

from emix_core.errors import NotFoundError
from emix_core.hub import packages as svc
from emix_core.hub.auth import audit_request, require
from emix_core.model import AuditAction, utcnow
from emix_core.store.db import ItemRow, PackageRow

bp = Blueprint("resume", __name__, url_prefix="/api/v1")


def _hub():  # type: ignore[no-untyped-def]
    return current_app.extensions["emix"]


def _open_for_sender(package_id: str):  # type: ignore[no-untyped-def]
    with _hub().db.session() as session:
        row, package = svc.load_package(session, package_id)
        principal = require("package:write", package)
        if row.state != "open":
            raise NotFoundError("no open package with that id (sealed, aborted or expired)")
        return row, principal


@bp.get("/packages/<package_id>/uploaded")
def uploaded(package_id: str) -> Response:
    """The items of an open package the hub already holds: ``{"items": {id: sha256}}``."""
    row, _principal = _open_for_sender(package_id)
    with _hub().db.session() as session:
        items = session.scalars(select(ItemRow).where(ItemRow.package_id == row.id)).all()
        stored = {str(i.item_id): {"sha256": i.sha256, "size": i.size} for i in items}
    return jsonify({"id": row.id, "state": "open", "items": stored})


@bp.delete("/packages/<package_id>")
def abort(package_id: str) -> Response:
    """Abort an open package: its blobs are deleted and its data key destroyed."""
    hub = _hub()
    row, principal = _open_for_sender(package_id)
    deleted = hub.blobs.delete_prefix(row.id)
    with hub.db.session() as session:
        current = session.get(PackageRow, row.id)
        current.wrapped_key = None
        current.summary = None
        current.state = "purged"
        current.purged_at = utcnow()
    audit_request(
        "study-deleted",
        action=AuditAction.DELETE,
        actor=principal.email,
        detail="open package aborted by its sender: blobs deleted, data key destroyed",
        package_id=row.id,
    )
    return jsonify({"id": row.id, "aborted": True, "blobs_deleted": deleted})
