"""The core's own tests. Fixtures come from :mod:`emix_core.testing` (a pytest plugin)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
