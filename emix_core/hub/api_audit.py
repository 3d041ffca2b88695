"""``/api/v1/audit``: the central audit trail, for facility admins."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, request

from emix_core.errors import InvalidInput
from emix_core.hub import packages as svc
from emix_core.hub.auth import current_principal, require

bp = Blueprint("audit", __name__, url_prefix="/api/v1")


@bp.get("/audit")
def audit_events() -> Response:
    """Events about one package the admin's facility sent or received (``?package=ID``)."""
    hub = current_app.extensions["emix"]
    principal = require("audit:read", current_principal().facility)
    package_id = request.args.get("package", "")
    if not package_id:
        raise InvalidInput("give ?package=ID")
    with hub.db.session() as session:
        _row, package = svc.load_package(session, package_id)
    involved = {package.sender, *(r.facility for r in package.recipients)}
    if principal.facility not in involved:
        from emix_core.errors import NotFoundError

        raise NotFoundError("not found")
    limit = min(max(request.args.get("limit", 100, type=int) or 100, 1), 1000)
    return jsonify({"events": hub.audit_log.events(package_id=package.id, limit=limit)})


@bp.get("/audit/checkpoint")
def latest_checkpoint() -> Response:
    """A freshly signed head of the hub's audit chain, for the caller to keep."""
    current_principal()
    hub = current_app.extensions["emix"]
    return jsonify(
        {"checkpoint": hub.audit_log.checkpoint(), "public_key": hub.signing_key.public_key_b64}
    )
