"""The built-in report formats, as a plugin (``emix.reports``) that others override.

Both hooks are ``trylast``: a vendor plugin that renders ``pdf`` its own way, or
reads a format of its own, answers first. Format modules are imported on first
use, so loading the plugin manager stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from emix_core.plugins import hookimpl
from emix_core.reports.convert import FORMATS, READABLE_FORMATS, format_for_media_type
from emix_core.reports.model import Report

__all__ = [
    "MODULES",
    "emix_parse_report",
    "emix_register_report_formats",
    "emix_render_report",
]

#: Format name to the module that implements it (``render``, and ``parse`` if readable).
MODULES = {
    name: f"emix_core.reports.{name}" for name in ("hl7", "cda", "fhir", "pdf", "rtf", "txt")
}


@hookimpl(trylast=True)
def emix_render_report(report: Report, format: str) -> bytes | None:
    """Render with the built-in module for ``format``; ``None`` for other formats."""
    module = MODULES.get(format)
    if module is None:
        return None
    return importlib.import_module(module).render(report)


@hookimpl(trylast=True)
def emix_parse_report(data: bytes, media_type: str) -> Report | None:
    """Parse HL7 v2, CDA, FHIR JSON or text; ``None`` for any other media type."""
    name = format_for_media_type(media_type)
    if name not in READABLE_FORMATS:
        return None
    return importlib.import_module(MODULES[name]).parse(data)


@hookimpl(trylast=True)
def emix_register_report_formats(register: Callable[..., None]) -> None:
    """Register the six built-in formats (HL7 v2, CDA, FHIR, PDF, RTF, text)."""
    for name, fmt in FORMATS.items():
        register(name, fmt.media_type, fmt.extension, readable=fmt.readable)
