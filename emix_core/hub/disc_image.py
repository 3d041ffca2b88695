"""A package as a CD image (ISO 9660, DICOMDIR after IHE PDI), for the browser's download.

The disc writer is ``emix_core.write_pdi_iso(entries, out)``; a hub without it offers the
zip only (:func:`available` says which). The image is built in a temporary file beside
the hub's data, since ISO 9660 needs to know every file before writing, and streamed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import Any

from flask import Response, current_app, stream_with_context

from emix_core.errors import EmixError


class DiscImageUnavailable(EmixError):
    http_status = 404
    code = "no_disc_writer"


def _writer() -> Any:
    try:
        import emix_core

        return emix_core.write_pdi_iso
    except (ImportError, AttributeError):
        return None


def available() -> bool:
    """Whether this hub can build CD images."""
    return _writer() is not None


def response(content: Any) -> Response:
    """Build the package's ISO into a temporary file and stream it (deleted afterwards)."""
    writer = _writer()
    if writer is None:
        raise DiscImageUnavailable("this hub cannot build CD images yet; download the zip")
    home = current_app.extensions["emix"].config.home
    handle, name = tempfile.mkstemp(prefix="disc-", suffix=".iso", dir=home)
    os.close(handle)
    try:
        entries = [(item, (lambda i=item: content.read_item(i.id))) for item in content.items]
        writer(entries, name)
        size = os.path.getsize(name)
    except BaseException:
        os.unlink(name)
        raise

    def generate() -> Iterator[bytes]:
        try:
            with open(name, "rb") as image:
                while chunk := image.read(1024 * 1024):
                    yield chunk
        finally:
            os.unlink(name)

    out = Response(stream_with_context(generate()), mimetype="application/x-iso9660-image")
    out.headers["Content-Length"] = str(size)
    out.headers["Content-Disposition"] = f'attachment; filename="emix-{content.id}.iso"'
    return out
