"""QIDO-RS: search for studies, series and instances (PS3.18 10.6).

Answers come from the sender's signed manifest (study summaries, series details and
per-instance image attributes); a package sent before those were recorded is answered
from the stored instances' headers, read one at a time without their pixel data.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Response, request

from emix_dicomweb.origin.attributes import (
    INSTANCE_KEYS,
    SERIES_KEYS,
    STUDY_KEYS,
    Record,
    to_json,
)
from emix_dicomweb.origin.blueprint import route
from emix_dicomweb.origin.matching import Query, parse_query
from emix_dicomweb.origin.scope import Located, Scope
from emix_dicomweb.origin.stored import read_header

__all__ = ["DICOM_JSON", "warning"]

DICOM_JSON = "application/dicom+json"
DEFAULT_CHARSET = ("", "ISO_IR 6", "ISO 2022 IR 6")


def warning(text: str) -> str:
    """A ``Warning`` header value (RFC 7234 5.5, code 299 as PS3.18 8.3.4 uses it)."""
    return f'299 emix "{text}"'


def _charset(value: str | None) -> list[str]:
    # DICOM JSON is UTF-8 whatever the instance's character set was
    return [] if (value or "") in DEFAULT_CHARSET else ["ISO_IR 192"]


def _by(located: list[Located], key: str) -> dict[str, list[Located]]:
    groups: dict[str, list[Located]] = {}
    for entry in located:
        groups.setdefault(getattr(entry, key), []).append(entry)
    return groups


def study_record(scope: Scope, study: str, members: list[Located]) -> Record:
    summary = scope.study_summary(study)
    modalities: list[str] = []
    for series, group in _by(members, "series").items():
        modality = series_record(scope, study, series, group).get("Modality", [""])[0]
        if modality and modality not in modalities:
            modalities.append(modality)
    for modality in summary.get("modalities") or []:
        if modality not in modalities:
            modalities.append(modality)
    return {
        "SpecificCharacterSet": _charset(summary.get("specific_character_set")),
        "StudyDate": [summary.get("study_date")],
        "StudyTime": [summary.get("study_time")],
        "AccessionNumber": [summary.get("accession_number")],
        "InstanceAvailability": ["ONLINE"],
        "ModalitiesInStudy": sorted(modalities),
        "ReferringPhysicianName": [summary.get("referring_physician_name")],
        "RetrieveURL": [scope.url(study)],
        "PatientName": [summary.get("patient_name")],
        "PatientID": [summary.get("patient_id")],
        "PatientBirthDate": [summary.get("patient_birth_date")],
        "PatientSex": [summary.get("patient_sex")],
        "StudyInstanceUID": [study],
        "StudyID": [summary.get("study_id")],
        "StudyDescription": [summary.get("study_description")],
        "NumberOfStudyRelatedSeries": [len({m.series for m in members})],
        "NumberOfStudyRelatedInstances": [len(members)],
        "SOPClassesInStudy": sorted({m.item.sop_class_uid or "" for m in members} - {""}),
    }


def series_record(scope: Scope, study: str, series: str, members: list[Located]) -> Record:
    detail = scope.series_summary(study, series)
    if detail is None:  # a package from an older sender: read the first instance's header
        detail = _series_from_header(members[0])
    number = detail.get("series_number")
    return {
        "SpecificCharacterSet": _charset(scope.study_summary(study).get("specific_character_set")),
        "Modality": [detail.get("modality")],
        "SeriesDescription": [detail.get("series_description")],
        "SeriesDate": [detail.get("series_date")],
        "SeriesTime": [detail.get("series_time")],
        "RetrieveURL": [scope.url(study, series)],
        "SeriesInstanceUID": [series],
        "SeriesNumber": [number],
        "NumberOfSeriesRelatedInstances": [len(members)],
        "StudyInstanceUID": [study],
    }


def _series_from_header(entry: Located) -> dict[str, Any]:
    ds, _, _ = read_header(entry.view.read_item(entry.item.id))
    number = ds.get("SeriesNumber")
    return {
        "modality": str(ds.get("Modality", "") or ""),
        "series_number": int(number) if number not in (None, "") else None,
        "series_description": str(ds.get("SeriesDescription", "") or ""),
        "series_date": str(ds.get("SeriesDate", "") or ""),
        "series_time": str(ds.get("SeriesTime", "") or ""),
    }


def instance_record(scope: Scope, entry: Located) -> Record:
    item = entry.item
    numbers: dict[str, Any] = {
        "InstanceNumber": item.instance_number,
        "Rows": item.rows,
        "Columns": item.columns,
        "BitsAllocated": item.bits_allocated,
        "NumberOfFrames": item.number_of_frames,
    }
    if all(v is None for v in numbers.values()):  # older manifest: read the header
        ds, _, pixel = read_header(entry.view.read_item(item.id))
        for keyword in numbers:
            value = ds.get(keyword)
            numbers[keyword] = int(value) if value not in (None, "") else None
        if pixel is not None and numbers["NumberOfFrames"] is None:
            numbers["NumberOfFrames"] = 1
    return {
        "SpecificCharacterSet": _charset(
            scope.study_summary(entry.study).get("specific_character_set")
        ),
        "SOPClassUID": [item.sop_class_uid],
        "SOPInstanceUID": [entry.sop],
        "InstanceAvailability": ["ONLINE"],
        "RetrieveURL": [scope.url(entry.study, entry.series, entry.sop)],
        "AvailableTransferSyntaxUID": [item.transfer_syntax_uid],
        "StudyInstanceUID": [entry.study],
        "SeriesInstanceUID": [entry.series],
        **{k: [v] for k, v in numbers.items()},
    }


def _answer(
    scope: Scope, query: Query, rows: list[dict[str, Any]], located: list[Located], what: str
) -> Response:
    page, more = query.page(rows)
    scope.audit("query", located, f"DICOMweb QIDO-RS {what}: {len(page)} results")
    response = Response(json.dumps(page), mimetype=DICOM_JSON)
    warnings = []
    if query.fuzzy:
        warnings.append(
            warning(
                "The fuzzymatching parameter is not supported. "
                "Only literal matching has been performed."
            )
        )
    ignored = sorted(set(query.filters) - STUDY_LEVEL - SERIES_LEVEL - INSTANCE_LEVEL)
    if ignored:
        warnings.append(
            warning(
                f"The following query keys are not supported and were ignored: {', '.join(ignored)}"
            )
        )
    if more:
        warnings.append(warning(f"There are {more} additional results that can be requested"))
    for text in warnings:
        response.headers.add("Warning", text)
    return response


STUDY_LEVEL = set(STUDY_KEYS) | {"StudyDescription", "SOPClassesInStudy"}
SERIES_LEVEL = set(SERIES_KEYS) | {"SeriesDate", "SeriesTime"}
INSTANCE_LEVEL = set(INSTANCE_KEYS) | {"AvailableTransferSyntaxUID"}


@route("/studies")
def search_studies(package_id: str | None = None) -> Response:
    query = parse_query(request.args)
    scope = Scope(package_id)
    rows, touched = [], []
    for study, members in _by(scope.instances(), "study").items():
        record = study_record(scope, study, members)
        if query.matches(record, STUDY_LEVEL):
            rows.append(to_json(record, query.returned(STUDY_KEYS, record)))
            touched += members[:1]
    return _answer(scope, query, rows, touched, "studies")


@route("/series")
@route("/studies/<study>/series")
def search_series(package_id: str | None = None, study: str | None = None) -> Response:
    query = parse_query(request.args)
    scope = Scope(package_id)
    located = scope.found(study) if study else scope.instances()
    ordered: list[tuple[tuple[str, bool, int], dict[str, Any]]] = []
    touched: list[Located] = []
    for study_uid, in_study in _by(located, "study").items():
        study_rec = study_record(scope, study_uid, in_study) if study is None else {}
        if study is None and not query.matches(study_rec, STUDY_LEVEL):
            continue
        for series, members in _by(in_study, "series").items():
            record = series_record(scope, study_uid, series, members)
            if not query.matches(record, SERIES_LEVEL):
                continue
            keys = query.returned(SERIES_KEYS, record)
            if study is None:
                record = {**study_rec, **record}
                keys = query.returned(STUDY_KEYS + SERIES_KEYS, record)
            number = (record.get("SeriesNumber") or [None])[0]
            ordered.append(((study_uid, number is None, number or 0), to_json(record, keys)))
            touched += members[:1]
    rows = [row for _, row in sorted(ordered, key=lambda pair: pair[0])]
    return _answer(scope, query, rows, touched, "series")


@route("/instances")
@route("/studies/<study>/instances")
@route("/studies/<study>/series/<series>/instances")
def search_instances(
    package_id: str | None = None, study: str | None = None, series: str | None = None
) -> Response:
    query = parse_query(request.args)
    scope = Scope(package_id)
    located = scope.found(study, series) if study else scope.instances()
    required: tuple[str, ...] = INSTANCE_KEYS
    if series is None:
        required += SERIES_KEYS
    if study is None:
        required += STUDY_KEYS
    rows, touched = [], []
    for study_uid, in_study in _by(located, "study").items():
        study_rec = study_record(scope, study_uid, in_study) if study is None else {}
        if study is None and not query.matches(study_rec, STUDY_LEVEL):
            continue
        for series_uid, members in _by(in_study, "series").items():
            series_rec = (
                series_record(scope, study_uid, series_uid, members) if series is None else {}
            )
            if series is None and not query.matches(series_rec, SERIES_LEVEL):
                continue
            for entry in members:
                record = {**study_rec, **series_rec, **instance_record(scope, entry)}
                if query.matches(record, INSTANCE_LEVEL):
                    rows.append(to_json(record, query.returned(required, record)))
                    touched.append(entry)
    return _answer(scope, query, rows, touched, "instances")
