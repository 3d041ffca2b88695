"""The hub's Flask app factory."""

from __future__ import annotations

import json
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
    hops = hub.config.hub.trusted_proxy_hops
    if hops:  # the client address is the entry the nearest trusted proxy added, no other
        from werkzeug.middleware.proxy_fix import ProxyFix

        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)  # type: ignore[method-assign]
    _register_blueprints(app, hub)
    _register_error_handlers(app)
    from emix_core.hub import metrics

    metrics.install(app)
    _register_access_log(app)
    app.after_request(security_headers)
    from emix_core.hub.outbox import start_worker

    start_worker(hub)  # mails queued by any process (or before a restart) go out
    return app


def _register_access_log(app: Flask) -> None:
    """One line per request naming the route template, never the values in the path
    (DICOMweb paths carry Study/Series/SOP Instance UIDs; query strings are left out)."""
    import time

    from flask import g, request

    access = logging.getLogger("emix.access")

    @app.before_request
    def started() -> None:
        g.emix_started = time.monotonic()

    @app.after_request
    def security_headers(response: Response) -> Response:
        """PHI is never cached, sniffed as another type, or shown inline by accident."""
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["X-Content-Type-Options"] = "nosniff"
        if request.path.startswith("/api/") and response.mimetype not in (
            "application/json",
            "text/html",
        ):
            response.headers.setdefault("Content-Disposition", "attachment")
        if request.is_secure:
            response.headers["Strict-Transport-Security"] = "max-age=31536000"
        return response

    @app.after_request
    def audit_head(response: Response) -> Response:
        """Every authenticated caller gets the signed head of the audit chain; clients
        keep it, so a cut of the hub's log is detected up to anyone's last contact."""
        if "principal" in g and request.path.startswith("/api/"):
            try:
                signed = app.extensions["emix"].audit_log.signed_head()
                response.headers["X-Emix-Audit-Checkpoint"] = json.dumps(
                    signed, separators=(",", ":")
                )
            except Exception:  # never fail an answer over its checkpoint
                log.exception("audit head not signed")
        return response

    @app.after_request
    def log_request(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
        took = (time.monotonic() - g.get("emix_started", time.monotonic())) * 1000
        quiet = route in (
            "/healthz",
            "/readyz",
            "/api/v1/inbox/cursor",
        ) and response.status_code in (
            200,
            304,
        )
        access.log(
            logging.DEBUG if quiet else logging.INFO,
            '%s "%s %s" %s %sms',
            request.remote_addr,
            request.method,
            route,
            response.status_code,
            int(took),
        )
        return response


#: The pages' policy: our own stylesheet and images only, no script at all, no framing.
PAGE_CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


def security_headers(response: Response) -> Response:
    """Every answer: no framing, no sniffing, no referrer (links carry one-time tokens)."""
    csp = response.headers.setdefault("Content-Security-Policy", PAGE_CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    if "frame-ancestors 'none'" in csp:  # a page that names who may frame it says so in CSP
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
        web_second_factor,
    )

    for bp in (api_packages.bp, api_inbox_cursor.bp, api_facilities.bp, api_audit.bp, web.bp):
        app.register_blueprint(bp)
    from emix_core.hub import api_accounts, api_progressive, api_resume

    app.register_blueprint(api_accounts.bp)
    app.register_blueprint(api_resume.bp)
    app.register_blueprint(api_progressive.bp)
    for bp in (web_packages.bp, web_admin.bp, web_second_factor.bp, web_patient.bp, viewer.bp):
        app.register_blueprint(bp)

    def register(blueprint, url_prefix: str | None = None) -> None:  # type: ignore[no-untyped-def]
        app.register_blueprint(blueprint, url_prefix=url_prefix)

    hooks_for(hub.pm).register_blueprints(register)


def _audit_integrity_failure(exc: EmixError) -> None:
    """A download refused because stored bytes failed authentication is audited."""
    from flask import g

    from emix_core.hub.auth import audit_request
    from emix_core.model import AuditAction, AuditOutcome

    actor = g.principal.email if "principal" in g else "unknown"
    route = request.url_rule.rule if request.url_rule else ""
    try:
        audit_request(
            "instances-transferred",
            action=AuditAction.READ,
            actor=actor,
            detail=f"refused ({exc.code}): {request.method} {route}",
            package_id=str((request.view_args or {}).get("package_id", ""))[:32],
            outcome=AuditOutcome.SERIOUS_FAILURE,
        )
    except Exception:  # never hide the answer behind an audit failure
        log.exception("audit of an integrity failure failed")


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
        message = exc.message
        if exc.code == "integrity" and request.view_args and "package_id" in request.view_args:
            _audit_integrity_failure(exc)
        if exc.http_status >= 500 and exc.http_status != 503:
            # a server-side fault: its text may name server paths; the log has it
            log.error("server error %s: %s", exc.code, exc.message)
            message = "the hub has a configuration or storage problem; its operator was logged"
        return jsonify({"error": exc.code, "message": message}), exc.http_status, headers

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
