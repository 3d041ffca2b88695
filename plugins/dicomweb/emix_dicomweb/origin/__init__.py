"""The hub as a DICOMweb origin server (PS3.18) for what each caller may read.

Mounted at ``/dicomweb`` (every package the caller may read) and at
``/api/v1/packages/<id>/dicomweb`` (one package): QIDO-RS searches
(:mod:`~emix_dicomweb.origin.qido`), WADO-RS instances, metadata, frames and bulk data
(:mod:`~emix_dicomweb.origin.wado`), rendered images and thumbnails
(:mod:`~emix_dicomweb.origin.rendered`), WADO-URI (:mod:`~emix_dicomweb.origin.wado_uri`),
with transcoding to Explicit VR Little Endian (:mod:`~emix_dicomweb.origin.transcode`)
and an optional CORS allow-list (:mod:`~emix_dicomweb.origin.cors`).
"""

from __future__ import annotations

from emix_dicomweb.origin import cors, qido, rendered, wado, wado_uri  # noqa: F401 (routes)
from emix_dicomweb.origin.blueprint import bp

__all__ = ["bp"]
