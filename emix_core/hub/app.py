"""The hub's Flask app factory."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pluggy
from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from emix_core.errors import EmixError
from emix_core.hub.context import Hub, open_hub
from emix_core.plugins import hooks_for

log = logging.getLogger("emix.hub")


def create_app(home: str | Path | None = None, pm: pluggy.PluginManager | None = None) -> Flask:
    """Build the hub's WSGI app for an initialised home (``emix hub init``)."""
    hub = open_hub(home, pm)
    app = Flask("emix_core.hub")
    app.extensions["emix"] = hub
    # Item uploads are streamed by our own code; Flask's form parsing never sees them.
    app.config["MAX_FORM_MEMORY_SIZE"] = hub.config.hub.max_json_bytes
    _register_blueprints(app, hub)
    _register_error_handlers(app)
    from emix_core.hub import metrics

    metrics.install(app)
    app.after_request(security_headers)
    return app


#: The pages' policy: our own stylesheet and images only, no script at all, no framing.
PAGE_CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


def security_headers(response: Response) -> Response:
    """Every answer: no framing, no sniffing, no referrer (links carry one-time tokens)."""
    response.headers.setdefault("Content-Security-Policy", PAGE_CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("X-Frame-Options", "DENY")
    if response.mimetype == "text/html":
        response.headers.setdefault("Cache-Control", "no-store")
    return response


def _register_blueprints(app: Flask, hub: Hub) -> None:
    from emix_core.hub import (
        api_audit,
        api_facilities,
        api_inbox_cursor,
        api_packages,
        viewer,
        web,
        web_admin,
        web_packages,
        web_patient,
    )

    for bp in (api_packages.bp, api_inbox_cursor.bp, api_facilities.bp, api_audit.bp, web.bp):
        app.register_blueprint(bp)
    from emix_core.hub import api_accounts, api_resume

    app.register_blueprint(api_accounts.bp)
    app.register_blueprint(api_resume.bp)
    for bp in (web_packages.bp, web_admin.bp, web_patient.bp, viewer.bp):
        app.register_blueprint(bp)

    def register(blueprint, url_prefix: str | None = None) -> None:  # type: ignore[no-untyped-def]
        app.register_blueprint(blueprint, url_prefix=url_prefix)

    hooks_for(hub.pm).register_blueprints(register)


def is_page_request() -> bool:
    """A request from a person's browser (pages), not from an API or DICOMweb client."""
    return not request.path.startswith(("/api/", "/dicomweb", "/viewer/", "/healthz"))


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(EmixError)
    def emix_error(exc: EmixError) -> Any:
        if is_page_request():
            from emix_core.hub.web import error_page

            return error_page(exc)
        headers = {"WWW-Authenticate": 'Bearer realm="emix"'} if exc.http_status == 401 else {}
        return jsonify({"error": exc.code, "message": exc.message}), exc.http_status, headers

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Any:
        if is_page_request():
            from emix_core.hub.web import message

            return message(exc.name, exc.description or "", status=exc.code or 500)
        return jsonify(
            {"error": exc.name.lower().replace(" ", "_"), "message": exc.description}
        ), exc.code or 500

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("unexpected error")
        return jsonify({"error": "internal", "message": "internal error; see the hub log"}), 500
