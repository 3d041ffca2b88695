"""The DICOMweb blueprint: every route at the hub's root service and per package.

``/dicomweb/...`` searches and retrieves across every package the caller may read;
``/api/v1/packages/<package_id>/dicomweb/...`` within one package. The views take an
optional ``package_id`` and build their :class:`~emix_dicomweb.origin.scope.Scope`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Blueprint

__all__ = ["ROOTS", "bp", "route"]

bp = Blueprint("dicomweb", __name__)

#: Where the service is mounted: the hub's root service, and each package.
ROOTS = ("/dicomweb", "/api/v1/packages/<package_id>/dicomweb")


def route(rule: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a GET view under both roots."""

    def register(view: Callable[..., Any]) -> Callable[..., Any]:
        for root in ROOTS:
            bp.add_url_rule(root + rule, view_func=view, methods=["GET"])
        return view

    return register
