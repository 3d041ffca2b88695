"""Cross-origin access for web viewers served from another origin (off by default).

Only origins listed in ``[hub] cors_origins`` get ``Access-Control-Allow-Origin``; the
preflight (``OPTIONS``) is answered without authentication, as browsers send it.
Credentials are bearer tokens in ``Authorization``, never cookies.
"""

from __future__ import annotations

from flask import Response, request

from emix_core import hub_settings
from emix_dicomweb.origin.blueprint import bp

__all__ = ["allow_listed_origins"]

EXPOSED = "Content-Type, Content-Length, Content-Location, Warning"


@bp.after_request
def allow_listed_origins(response: Response) -> Response:
    origin = request.headers.get("Origin")
    if not origin or origin not in (hub_settings().cors_origins or []):
        return response
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers.add("Vary", "Origin")
    response.headers["Access-Control-Expose-Headers"] = EXPOSED
    if request.method == "OPTIONS":
        response.headers["Access-Control-Allow-Methods"] = "GET, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Accept, Content-Type"
        response.headers["Access-Control-Max-Age"] = "600"
    return response
