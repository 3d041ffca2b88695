"""A read-only DICOMweb service per package on the hub, for its authorized recipients.

Under ``/api/v1/packages/<id>/dicomweb``: QIDO-RS (``/studies``, ``/studies/{s}/series``,
``/studies/{s}/series/{se}/instances``, ``/studies/{s}/instances``) answered from the
signed manifest, and WADO-RS (``/studies/{s}``, ``.../series/{se}``,
``.../instances/{i}``) streaming the decrypted items as ``multipart/related``, exactly
as the sender stored them (never transcoded). Same rules as the rest of the API: the
package must be sealed and readable by the caller, anyone else gets 404.
"""

from __future__ import annotations

import fnmatch
import io
import json
import secrets
import warnings
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, request, stream_with_context

from emix_core import (
    DICOM_MEDIA_TYPE,
    AuditAction,
    AuditEvent,
    EmixError,
    InvalidInput,
    Item,
    NotFoundError,
    PackageContent,
    audit_hub_event,
    hub_public_url,
    open_package,
)
from emix_dicomweb.multipart import media_type_parameters

__all__ = ["bp"]

bp = Blueprint("dicomweb", __name__, url_prefix="/api/v1/packages/<package_id>/dicomweb")

DICOM_JSON = "application/dicom+json"
HEADER_BYTES = 256 * 1024
MAX_LIMIT = 10_000


class NotAcceptable(EmixError):
    """The caller asks for a transfer syntax the instances are not stored in."""

    http_status = 406
    code = "not_acceptable"


def _open(package_id: str) -> PackageContent:
    return open_package(package_id)


def _audit(view: PackageContent, event_type: str, studies: list[str], detail: str) -> None:
    audit_hub_event(
        AuditEvent(
            event_type=event_type,
            action=(
                AuditAction.READ if event_type == "instances-transferred" else AuditAction.EXECUTE
            ),
            actor=view.principal.email,
            package_id=view.id,
            phi={"studies": sorted(set(studies))},
            detail=detail,
        )
    )


# --------------------------------------------------------------------------- QIDO-RS


def _attr(vr: str, *values: Any) -> dict[str, Any]:
    present = [v for v in values if v not in (None, "")]
    return {"vr": vr, "Value": present} if present else {"vr": vr}


def _base_url(view: PackageContent) -> str:
    return f"{hub_public_url()}/api/v1/packages/{view.id}/dicomweb"


def _matches(params: dict[str, str], names: tuple[str, ...], actual: Any) -> bool:
    for name in names:
        wanted = params.get(name)
        if wanted is None or wanted == "":
            continue
        text = "" if actual is None else str(actual)
        if "," in wanted and "*" not in wanted:
            return text in [w.strip() for w in wanted.split(",")]
        return fnmatch.fnmatchcase(text.upper(), wanted.upper())
    return True


def _has_modality(params: dict[str, str], modalities: list[str]) -> bool:
    wanted = params.get("ModalitiesInStudy") or params.get("00080061")
    if not wanted:
        return True
    return any(w.strip().upper() in modalities for w in wanted.split(","))


def _page(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    try:
        offset = max(int(request.args.get("offset", 0)), 0)
        limit = min(max(int(request.args.get("limit", MAX_LIMIT)), 0), MAX_LIMIT)
    except ValueError as exc:
        raise InvalidInput("limit and offset must be whole numbers") from exc
    return rows[offset : offset + limit]


def _json(rows: list[dict[str, Any]]) -> Response:
    return Response(json.dumps(rows), mimetype=DICOM_JSON)


def _study_json(view: PackageContent, uid: str) -> dict[str, Any]:
    summary = view.studies.get(uid, {})
    instances = view.dicom_items(uid)
    return {
        "00080020": _attr("DA", summary.get("study_date")),
        "00080050": _attr("SH", summary.get("accession_number")),
        "00080061": _attr("CS", *(summary.get("modalities") or [])),
        "00081030": _attr("LO", summary.get("study_description")),
        "00081190": _attr("UR", f"{_base_url(view)}/studies/{uid}"),
        "00100010": _attr(
            "PN", {"Alphabetic": summary["patient_name"]} if summary.get("patient_name") else None
        ),
        "00100020": _attr("LO", summary.get("patient_id")),
        "0020000D": _attr("UI", uid),
        "00201206": _attr("IS", len({i.series_uid for i in instances})),
        "00201208": _attr("IS", len(instances)),
    }


@bp.get("/studies")
def search_studies(package_id: str) -> Response:
    view = _open(package_id)
    args = request.args
    rows = []
    for uid in sorted({i.study_uid for i in view.dicom_items() if i.study_uid}):
        summary = view.studies.get(uid, {})
        if not (
            _matches(args, ("StudyInstanceUID", "0020000D"), uid)
            and _matches(args, ("PatientID", "00100020"), summary.get("patient_id"))
            and _matches(args, ("AccessionNumber", "00080050"), summary.get("accession_number"))
            and _matches(args, ("StudyDate", "00080020"), summary.get("study_date"))
            and _has_modality(args, summary.get("modalities") or [])
        ):
            continue
        rows.append(_study_json(view, uid))
    rows = _page(rows)
    _audit(view, "query", [r["0020000D"]["Value"][0] for r in rows], "DICOMweb QIDO-RS studies")
    return _json(rows)


def _series_header(view: PackageContent, item: Item) -> dict[str, Any]:
    """Series attributes read from the start of one decrypted instance (no pixel data)."""
    import pydicom

    stream = view.read_item(item.id)
    head = bytearray()
    try:
        for chunk in stream:
            head += chunk
            if len(head) >= HEADER_BYTES:
                break
    finally:
        stream.close()  # type: ignore[attr-defined]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(bytes(head)), stop_before_pixels=True, force=True)
            return {
                "modality": str(ds.get("Modality", "") or ""),
                "number": ds.get("SeriesNumber"),
                "description": str(ds.get("SeriesDescription", "") or ""),
            }
    except Exception:  # a header beyond the first bytes: answer without those attributes
        return {}


@bp.get("/studies/<study>/series")
def search_series(package_id: str, study: str) -> Response:
    view = _open(package_id)
    instances = view.dicom_items(study)
    if not instances:
        raise NotFoundError("not found")
    rows = []
    for series in sorted({i.series_uid for i in instances if i.series_uid}):
        members = [i for i in instances if i.series_uid == series]
        header = _series_header(view, members[0])
        if not (
            _matches(request.args, ("SeriesInstanceUID", "0020000E"), series)
            and _matches(request.args, ("Modality", "00080060"), header.get("modality"))
        ):
            continue
        number = header.get("number")
        rows.append(
            {
                "00080060": _attr("CS", header.get("modality")),
                "0008103E": _attr("LO", header.get("description")),
                "00081190": _attr("UR", f"{_base_url(view)}/studies/{study}/series/{series}"),
                "0020000D": _attr("UI", study),
                "0020000E": _attr("UI", series),
                "00200011": _attr("IS", int(number) if number not in (None, "") else None),
                "00201209": _attr("IS", len(members)),
            }
        )
    rows = _page(rows)
    _audit(view, "query", [study], "DICOMweb QIDO-RS series")
    return _json(rows)


@bp.get("/studies/<study>/instances")
@bp.get("/studies/<study>/series/<series>/instances")
def search_instances(package_id: str, study: str, series: str | None = None) -> Response:
    view = _open(package_id)
    instances = view.dicom_items(study, series)
    if not instances:
        raise NotFoundError("not found")
    base = _base_url(view)
    rows = [
        {
            "00080016": _attr("UI", i.sop_class_uid),
            "00080018": _attr("UI", i.sop_instance_uid),
            "00081190": _attr(
                "UR", f"{base}/studies/{study}/series/{i.series_uid}/instances/{i.sop_instance_uid}"
            ),
            "00083002": _attr("UI", i.transfer_syntax_uid),
            "0020000D": _attr("UI", study),
            "0020000E": _attr("UI", i.series_uid),
        }
        for i in instances
        if _matches(request.args, ("SOPInstanceUID", "00080018"), i.sop_instance_uid)
        and _matches(request.args, ("SOPClassUID", "00080016"), i.sop_class_uid)
        and _matches(request.args, ("SeriesInstanceUID", "0020000E"), i.series_uid)
    ]
    rows = _page(rows)
    _audit(view, "query", [study], "DICOMweb QIDO-RS instances")
    return _json(rows)


# --------------------------------------------------------------------------- WADO-RS


def _acceptable(items: list[Item]) -> None:
    """406 when the caller names transfer syntaxes that the stored instances are not in."""
    accept = request.headers.get("Accept", "")
    wanted: set[str] = set()
    for entry in accept.split(","):
        if not entry.strip():
            continue
        media_type, params = media_type_parameters(entry)
        if media_type in ("*/*", "multipart/*") or (
            media_type == "multipart/related"
            and params.get("type", DICOM_MEDIA_TYPE) in (DICOM_MEDIA_TYPE, "*/*")
        ):
            syntax = params.get("transfer-syntax")
            if syntax is None or syntax == "*":
                return
            wanted.add(syntax)
        elif media_type == DICOM_MEDIA_TYPE:
            return
    if not accept.strip():
        return
    if not wanted or any(i.transfer_syntax_uid not in wanted for i in items):
        raise NotAcceptable(
            "instances are served only as stored (emix never transcodes); ask with "
            'Accept: multipart/related; type="application/dicom"; transfer-syntax=*'
        )


def _multipart(view: PackageContent, items: list[Item]) -> Response:
    boundary = f"emix-{secrets.token_hex(16)}"
    heads = [
        (
            f"--{boundary}\r\nContent-Type: application/dicom"
            + (f"; transfer-syntax={i.transfer_syntax_uid}" if i.transfer_syntax_uid else "")
            + f"\r\nContent-Length: {i.size}\r\n\r\n"
        ).encode("ascii")
        for i in items
    ]
    tail = f"--{boundary}--\r\n".encode("ascii")
    length = sum(len(h) + i.size + 2 for h, i in zip(heads, items, strict=True)) + len(tail)
    first = view.read_item(items[0].id)
    first_chunk = next(first, b"")  # a tampered first segment fails before the 200

    def generate() -> Iterator[bytes]:
        for index, (head, item) in enumerate(zip(heads, items, strict=True)):
            yield head
            if index == 0:
                yield first_chunk
                yield from first
            else:
                yield from view.read_item(item.id)
            yield b"\r\n"
        yield tail

    response = Response(
        stream_with_context(generate()),
        content_type=f'multipart/related; type="application/dicom"; boundary={boundary}',
    )
    response.headers["Content-Length"] = str(length)
    return response


def _retrieve(view: PackageContent, items: list[Item], what: str) -> Response:
    if not items:
        raise NotFoundError("not found")
    _acceptable(items)
    response = _multipart(view, items)
    _audit(
        view,
        "instances-transferred",
        [i.study_uid or "" for i in items],
        f"DICOMweb WADO-RS {what}: {len(items)} instances",
    )
    return response


@bp.get("/studies/<study>")
def retrieve_study(package_id: str, study: str) -> Response:
    view = _open(package_id)
    return _retrieve(view, view.dicom_items(study), "study")


@bp.get("/studies/<study>/series/<series>")
def retrieve_series(package_id: str, study: str, series: str) -> Response:
    view = _open(package_id)
    return _retrieve(view, view.dicom_items(study, series), "series")


@bp.get("/studies/<study>/series/<series>/instances/<instance>")
def retrieve_instance(package_id: str, study: str, series: str, instance: str) -> Response:
    view = _open(package_id)
    items = [i for i in view.dicom_items(study, series) if i.sop_instance_uid == instance]
    return _retrieve(view, items, "instance")
