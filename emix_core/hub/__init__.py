"""The hub: a Flask app factory with one blueprint per feature, served by gunicorn.

``create_app`` lives in :mod:`emix_core.hub.app`; it is re-exported lazily so that
importing a hub module (the built-in token plugin, say) stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from emix_core.hub.app import create_app

        return create_app
    raise AttributeError(name)
