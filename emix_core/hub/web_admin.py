"""Pages of a facility administrator: members, pending confirmations, audit, usage."""

from __future__ import annotations

from flask import Blueprint

bp = Blueprint("web_admin", __name__, url_prefix="/admin")
