"""A package as a CD image (ISO 9660, DICOMDIR after IHE PDI), for the browser's download.

The disc writer is ``emix_core.write_pdi_iso(entries, out)`` (entries: each item with a
callable opening its bytes); a hub without it offers the zip only (:func:`available`).
The image is built in a temporary file beside the hub's data, since ISO 9660 needs to
know every file before writing, and then streamed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

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


def _opener(content: Any, item_id: int) -> Callable[[], BinaryIO]:
    """Open an item as a seekable stream (the writer reads DICOM headers with pydicom):
    decrypted into a spooled temporary file, in memory up to 8 MiB, on disk beyond."""

    def open_item() -> BinaryIO:
        spool = tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024)  # noqa: SIM115
        for chunk in content.read_item(item_id):
            spool.write(chunk)
        spool.seek(0)
        return spool  # type: ignore[return-value]

    return open_item


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
        entries = [(item, _opener(content, item.id)) for item in content.items]
        with open(name, "w+b") as sink:
            writer(entries, sink, volume_id=f"EMIX {content.id[:8]}")
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
