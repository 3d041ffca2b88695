"""QIDO-RS: find studies on a PACS and list what a study holds (through dicomweb-client)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import requests

from emix_core import is_valid_uid
from emix_dicomweb.connection import PacsConnection, PacsError

__all__ = [
    "StudyMatch",
    "find_studies",
    "list_instances",
    "study_filters",
]

T = TypeVar("T")

STUDY_UID = "0020000D"
SERIES_UID = "0020000E"
SOP_INSTANCE_UID = "00080018"
SOP_CLASS_UID = "00080016"
PATIENT_ID = "00100020"
ACCESSION = "00080050"
STUDY_DATE = "00080020"
STUDY_INSTANCES = "00201208"
#: Largest page asked for at once; a PACS may return less and say so.
PAGE = 1000


@dataclass
class StudyMatch:
    """A study a query found (PHI: never log these values)."""

    study_uid: str
    patient_id: str = ""
    accession_number: str = ""
    study_date: str = ""
    instances: int | None = None


def value(attributes: dict[str, Any], tag: str) -> Any:
    """The first value of a DICOM JSON attribute, or ``None``."""
    values = (attributes.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def study_filters(
    *, study: str | None = None, accession: str | None = None, patient_id: str | None = None
) -> dict[str, str]:
    """QIDO-RS matching keys for the CLI's ``--study``/``--accession``/``--patient-id``."""
    filters: dict[str, str] = {}
    if study:
        if not is_valid_uid(study):
            raise PacsError("--study must be a DICOM UID (digits and dots)")
        filters["StudyInstanceUID"] = study
    if accession:
        filters["AccessionNumber"] = accession
    if patient_id:
        filters["PatientID"] = patient_id
    return filters


def _call(conn: PacsConnection, what: str, call: Callable[[], T]) -> T:
    try:
        return call()
    except PacsError:
        raise
    except requests.HTTPError as exc:
        raise conn.error_for(exc.response, what) from exc
    except requests.RequestException as exc:
        raise conn.transport_error(exc) from exc
    except ValueError as exc:  # JSON that is not DICOM JSON
        raise PacsError(f"{what} on the PACS at {conn.host} answered malformed JSON") from exc


def _pages(
    conn: PacsConnection, what: str, fetch: Callable[[int], list[dict[str, Any]]], key: str
) -> list[dict[str, Any]]:
    """Every row of a paged QIDO-RS answer (``limit``/``offset``).

    Stops at a short page, or at a page that brings nothing new: a PACS that ignores
    ``offset`` must not make emix loop forever.
    """
    rows: list[dict[str, Any]] = []
    seen: set[Any] = set()
    while True:
        offset = len(rows)
        page = _call(conn, what, lambda: fetch(offset))  # noqa: B023 - called at once
        fresh = [row for row in page if value(row, key) not in seen]
        for row in fresh:
            seen.add(value(row, key))
        rows += fresh
        if len(page) < PAGE or not fresh:
            return rows


def find_studies(conn: PacsConnection, filters: dict[str, str]) -> list[StudyMatch]:
    """Studies matching QIDO-RS ``filters`` (e.g. ``{"AccessionNumber": "A12"}``).

    :raises PacsError: the PACS refused the query.
    """
    rows = _pages(
        conn,
        "QIDO-RS (studies)",
        lambda offset: conn.qido().search_for_studies(
            search_filters=dict(filters), fields=[STUDY_INSTANCES], limit=PAGE, offset=offset
        ),
        STUDY_UID,
    )
    found: dict[str, StudyMatch] = {}
    for row in rows:
        uid = value(row, STUDY_UID)
        if not isinstance(uid, str) or not is_valid_uid(uid):
            continue  # a PACS answer without a usable UID cannot be retrieved
        count = str(value(row, STUDY_INSTANCES) or "")
        found.setdefault(
            uid,
            StudyMatch(
                study_uid=uid,
                patient_id=str(value(row, PATIENT_ID) or ""),
                accession_number=str(value(row, ACCESSION) or ""),
                study_date=str(value(row, STUDY_DATE) or ""),
                instances=int(count) if count.isdigit() else None,
            ),
        )
    return list(found.values())


def list_instances(conn: PacsConnection, study_uid: str) -> list[tuple[str, str]]:
    """``(series UID, SOP instance UID)`` of every instance of a study (``[]`` when absent)."""
    rows = _pages(
        conn,
        "QIDO-RS (instances)",
        lambda offset: conn.qido().search_for_instances(
            study_instance_uid=study_uid,
            fields=[SERIES_UID, SOP_INSTANCE_UID],
            limit=PAGE,
            offset=offset,
        ),
        SOP_INSTANCE_UID,
    )
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for row in rows:
        series, sop = value(row, SERIES_UID), value(row, SOP_INSTANCE_UID)
        if isinstance(series, str) and isinstance(sop, str) and sop not in seen:
            seen.add(sop)
            out.append((series, sop))
    return out
