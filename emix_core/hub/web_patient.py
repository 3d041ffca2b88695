"""Patient access: one study, shared with a patient's mail address and a code given in person."""

from __future__ import annotations

from flask import Blueprint

bp = Blueprint("web_patient", __name__, url_prefix="/patient")
