"""WADO-URI (PS3.18 9): ``/dicomweb/wado?requestType=WADO&studyUID=..&seriesUID=..&objectUID=..``.

Older viewers and EMR links use it. ``contentType=application/dicom`` (with an optional
``transferSyntax``) sends the instance as one part; ``image/jpeg`` (the default) and
``image/png`` render it, with ``windowCenter``/``windowWidth``, ``rows``/``columns`` and
``frameNumber``.
"""

from __future__ import annotations

from flask import Response, request

from emix_core import DICOM_MEDIA_TYPE, InvalidInput, NotAcceptable
from emix_dicomweb.origin.blueprint import route
from emix_dicomweb.origin.rendered import FORMATS, render
from emix_dicomweb.origin.scope import Scope
from emix_dicomweb.origin.stored import StoredInstance
from emix_dicomweb.origin.transcode import EXPLICIT_LE, can_decode, instance_stream

__all__ = ["wado_uri"]


@route("/wado")
def wado_uri(package_id: str | None = None) -> Response:
    args = request.args
    if args.get("requestType") != "WADO":
        raise InvalidInput("WADO-URI needs requestType=WADO")
    uids = [args.get(name, "") for name in ("studyUID", "seriesUID", "objectUID")]
    if not all(uids):
        raise InvalidInput("WADO-URI needs studyUID, seriesUID and objectUID")
    scope = Scope(package_id)
    entry = scope.found(*uids)[0]
    content_types = [
        c.strip().split(";")[0] for c in args.get("contentType", "image/jpeg").split(",")
    ]
    stored_syntax = entry.item.transfer_syntax_uid or ""
    for content_type in content_types:
        if content_type == DICOM_MEDIA_TYPE:
            wanted = args.get("transferSyntax") or EXPLICIT_LE
            if wanted in ("*", stored_syntax) or not can_decode(stored_syntax):
                if wanted not in ("*", stored_syntax):
                    raise NotAcceptable("the hub cannot decode this instance; ask transferSyntax=*")
                body = entry.view.read_item(entry.item.id)
            elif wanted == EXPLICIT_LE:
                body = instance_stream(StoredInstance(entry.view.read_item(entry.item.id)))
            else:
                raise NotAcceptable(
                    "WADO-URI sends instances as stored or Explicit VR Little Endian"
                )
            scope.audit("instances-transferred", [entry], "WADO-URI instance")
            return Response(body, content_type=DICOM_MEDIA_TYPE)
        if content_type in FORMATS or content_type in ("*/*", "image/*"):
            media_type = content_type if content_type in FORMATS else "image/jpeg"
            viewport = None
            if args.get("rows") or args.get("columns"):
                try:
                    viewport = (int(args.get("columns") or 4096), int(args.get("rows") or 4096))
                except ValueError:
                    raise InvalidInput("rows and columns are whole numbers") from None
            try:
                frame = int(args.get("frameNumber", "1") or 1)
            except ValueError:
                raise InvalidInput("frameNumber is a whole number") from None
            stored = StoredInstance(entry.view.read_item(entry.item.id))
            try:
                image = render(stored, frame, media_type, viewport)
            finally:
                stored.close()
            scope.audit("instances-transferred", [entry], "WADO-URI rendered")
            return Response(image, content_type=media_type)
    raise NotAcceptable("WADO-URI sends application/dicom, image/jpeg or image/png")
