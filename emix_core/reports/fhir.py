"""FHIR R4: a DiagnosticReport in a ``collection`` Bundle with its Patient and ImagingStudy.

Written: Patient (identifier type MR, issuer as ``assigner.display``), Organization
(the performing facility), Practitioner (the radiologist, ``resultsInterpreter``),
ImagingStudy (study instance UID as ``urn:dicom:uid``, accession number as an ACSN
identifier, procedure code, start time), Observation (the findings, LOINC 18782-3),
DiagnosticReport (status, LOINC 18748-4, ``conclusion`` = impression,
``presentedForm`` = attachments). Validated with fhir.resources' R4B models (the
same structures as R4 for these resources). fhir.resources checks structure but not
code values, so status, gender and bundle type are checked here, on the way in and
on the way out.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import date, datetime
from typing import Any

from emix_core.errors import ReportFormatError
from emix_core.reports.codes import LOINC, is_oid
from emix_core.reports.model import (
    Attachment,
    Author,
    Code,
    Patient,
    PersonName,
    Report,
    is_valid_uid,
)

__all__ = ["MEDIA_TYPE", "parse", "render", "validate"]

MEDIA_TYPE = "application/fhir+json"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
DICOM_UID_SYSTEM = "urn:dicom:uid"

REPORT_STATUSES = {
    "registered": "preliminary",
    "partial": "preliminary",
    "preliminary": "preliminary",
    "final": "final",
    "amended": "amended",
    "corrected": "amended",
    "appended": "amended",
}
REJECTED_STATUSES = {"cancelled", "entered-in-error", "unknown"}
OBSERVATION_STATUSES = {
    "registered", "preliminary", "final", "amended", "corrected", "cancelled",
    "entered-in-error", "unknown",
}  # fmt: skip
BUNDLE_TYPES = {
    "document", "message", "transaction", "transaction-response", "batch", "batch-response",
    "history", "searchset", "collection",
}  # fmt: skip
IMAGING_STUDY_STATUSES = {"registered", "available", "cancelled", "entered-in-error", "unknown"}
GENDERS = {"male": "M", "female": "F", "other": "O", "unknown": "U"}
_GENDER_TO_FHIR = {v: k for k, v in GENDERS.items()}
FINDINGS_CODE = "18782-3"


# --------------------------------------------------------------------------- render


def _uuid() -> str:
    return str(uuid.uuid4())


def _human_name(name: PersonName) -> dict[str, Any]:
    result: dict[str, Any] = {}
    if name.family:
        result["family"] = name.family
    given = [part for part in (name.given, name.middle) if part]
    if given:
        result["given"] = given
    if name.prefix:
        result["prefix"] = [name.prefix]
    if name.suffix:
        result["suffix"] = [name.suffix]
    return result


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _drop_empty(value: Any) -> Any:
    if isinstance(value, dict):
        cleaned = {k: _drop_empty(v) for k, v in value.items()}
        return {k: v for k, v in cleaned.items() if v not in (None, "", [], {})}
    if isinstance(value, list):
        return [v for v in (_drop_empty(item) for item in value) if v not in (None, "", [], {})]
    return value


def _coding(code: Code) -> dict[str, Any]:
    coding: dict[str, Any] = {"code": code.code, "display": code.display}
    if code.system and ":" in code.system:
        coding["system"] = code.system
    return {"coding": [coding] if code.code else [], "text": code.display}


def render(report: Report) -> bytes:
    """Render a FHIR R4 Bundle (JSON, UTF-8) and validate it."""
    status = report.status
    refs = {kind: f"urn:uuid:{_uuid()}" for kind in ("patient", "org", "author", "study", "obs")}
    entries: list[tuple[str, dict[str, Any]]] = []

    patient = report.patient
    identifier: dict[str, Any] = {
        "use": "usual",
        "type": {"coding": [{"system": V2_0203, "code": "MR"}]},
        "value": patient.id,
        "assigner": {"display": patient.issuer},
    }
    if is_oid(patient.issuer):
        identifier["system"] = f"urn:oid:{patient.issuer}"
    entries.append(
        (
            refs["patient"],
            {
                "resourceType": "Patient",
                "identifier": [identifier] if patient.id else [],
                "name": [_human_name(patient.name)],
                "gender": _GENDER_TO_FHIR.get(patient.sex),
                "birthDate": patient.birth_date.isoformat() if patient.birth_date else None,
            },
        )
    )
    subject = {"reference": refs["patient"]}
    if report.facility:
        entries.append((refs["org"], {"resourceType": "Organization", "name": report.facility}))
    if report.author:
        practitioner_id = {"value": report.author.id} if report.author.id else {}
        entries.append(
            (
                refs["author"],
                {
                    "resourceType": "Practitioner",
                    "identifier": [practitioner_id],
                    "name": [_human_name(report.author.name)],
                },
            )
        )
    study_ids: list[dict[str, Any]] = []
    if report.study_instance_uid:
        study_ids.append(
            {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{report.study_instance_uid}"}
        )
    if report.accession_number:
        study_ids.append(
            {
                "type": {"coding": [{"system": V2_0203, "code": "ACSN"}]},
                "value": report.accession_number,
            }
        )
    entries.append(
        (
            refs["study"],
            {
                "resourceType": "ImagingStudy",
                "status": "available" if report.study_instance_uid else "unknown",
                "subject": subject,
                "identifier": study_ids,
                "started": _iso(report.observation_time),
                "procedureCode": [_coding(report.procedure)] if report.procedure else [],
            },
        )
    )
    if report.findings:
        entries.append(
            (
                refs["obs"],
                {
                    "resourceType": "Observation",
                    "status": status,
                    "code": {
                        "coding": [
                            {"system": LOINC.uri, "code": FINDINGS_CODE, "display": "Findings"}
                        ]
                    },
                    "subject": subject,
                    "effectiveDateTime": _iso(report.observation_time),
                    "valueString": report.findings,
                },
            )
        )
    diagnostic_report = {
        "resourceType": "DiagnosticReport",
        "status": status,
        "category": [{"coding": [{"system": V2_0074, "code": "RAD", "display": "Radiology"}]}],
        "code": {
            "coding": [
                {"system": LOINC.uri, "code": "18748-4", "display": "Diagnostic imaging study"}
            ]
        },
        "subject": subject,
        "effectiveDateTime": _iso(report.observation_time),
        "issued": _iso(report.report_time),
        "performer": [{"reference": refs["org"]}] if report.facility else [],
        "resultsInterpreter": [{"reference": refs["author"]}] if report.author else [],
        "result": [{"reference": refs["obs"]}] if report.findings else [],
        "imagingStudy": [{"reference": refs["study"]}],
        "conclusion": report.impression,
        "presentedForm": [
            {
                "contentType": a.media_type,
                "data": base64.b64encode(a.data).decode("ascii"),
                "title": a.title,
            }
            for a in report.attachments
        ],
    }
    entries.append((f"urn:uuid:{_uuid()}", diagnostic_report))
    bundle = _drop_empty(
        {
            "resourceType": "Bundle",
            "id": _uuid(),
            "type": "collection",
            "timestamp": datetime.now().astimezone().replace(microsecond=0).isoformat(),
            "entry": [{"fullUrl": url, "resource": resource} for url, resource in entries],
        }
    )
    validate(bundle)
    return json.dumps(bundle, ensure_ascii=False, indent=2).encode("utf-8")


# --------------------------------------------------------------------------- validate


def _field_paths(exc: Any) -> str:
    """Where validation failed, without the offending values (they may be PHI)."""
    paths = [".".join(str(p) for p in err.get("loc", ())) for err in exc.errors()[:3]]
    return ", ".join(p for p in paths if p) or "structure"


def validate(bundle: dict[str, Any]) -> None:
    """Validate a Bundle with fhir.resources, then the code values it does not check.

    :raises ReportFormatError: naming the failing fields, never their values.
    """
    from fhir.resources.R4B.bundle import Bundle
    from pydantic import ValidationError

    try:
        Bundle.model_validate(bundle)
    except ValidationError as exc:
        raise ReportFormatError(f"the FHIR Bundle is invalid at {_field_paths(exc)}") from None
    except (ValueError, TypeError, RecursionError):
        raise ReportFormatError("the FHIR Bundle is invalid") from None
    if bundle.get("type") not in BUNDLE_TYPES:
        raise ReportFormatError("the FHIR Bundle's type is not a Bundle.type code")
    for entry in bundle.get("entry", []):
        resource = entry.get("resource") or {}
        _check_codes(resource)


def _check_codes(resource: dict[str, Any]) -> None:
    kind = resource.get("resourceType")
    checks = {
        "DiagnosticReport": ("status", set(REPORT_STATUSES) | REJECTED_STATUSES),
        "Observation": ("status", OBSERVATION_STATUSES),
        "ImagingStudy": ("status", IMAGING_STUDY_STATUSES),
        "Patient": ("gender", set(GENDERS)),
        "Practitioner": ("gender", set(GENDERS)),
    }
    if kind in checks:
        name, allowed = checks[kind]
        if name in resource and resource[name] not in allowed:
            raise ReportFormatError(f"the FHIR {kind}.{name} is not a code of its value set")


# --------------------------------------------------------------------------- parse


def _parse_datetime(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        if len(value) == 4:
            return datetime(int(value), 1, 1)
        if len(value) == 7:
            return datetime(int(value[:4]), int(value[5:7]), 1)
        return datetime.fromisoformat(value)
    except ValueError:
        raise ReportFormatError("a FHIR date-time is not valid") from None


def _parse_name(names: list[dict[str, Any]] | None) -> PersonName:
    if not names:
        return PersonName()
    chosen = next((n for n in names if n.get("use") in (None, "official", "usual")), names[0])
    given = chosen.get("given") or []
    if not (chosen.get("family") or given) and chosen.get("text"):
        return PersonName(family=chosen["text"])
    return PersonName(
        family=chosen.get("family") or "",
        given=given[0] if given else "",
        middle=" ".join(g for g in given[1:] if g),
        prefix=" ".join(chosen.get("prefix") or []),
        suffix=" ".join(chosen.get("suffix") or []),
    )


def _load(data: bytes) -> dict[str, Any]:
    try:
        document = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ReportFormatError("the FHIR document is not valid UTF-8 JSON") from None
    if not isinstance(document, dict):
        raise ReportFormatError("the FHIR document is not a JSON object")
    kind = document.get("resourceType")
    if kind == "DiagnosticReport":  # a bare report: wrap it, its contained resources help
        document = {"resourceType": "Bundle", "type": "collection",
                    "entry": [{"resource": document}]}  # fmt: skip
    elif kind != "Bundle":
        raise ReportFormatError("the FHIR document is neither a Bundle nor a DiagnosticReport")
    validate(document)
    return document


class _Resolver:
    """Find the resource a reference points at, in the Bundle or among contained ones."""

    def __init__(self, bundle: dict[str, Any], report: dict[str, Any]) -> None:
        self.index: dict[str, dict[str, Any]] = {}
        for entry in bundle.get("entry", []):
            resource = entry.get("resource") or {}
            if entry.get("fullUrl"):
                self.index[entry["fullUrl"]] = resource
            if resource.get("id"):
                self.index[f"{resource.get('resourceType')}/{resource['id']}"] = resource
        for contained in report.get("contained", []):
            if contained.get("id"):
                self.index[f"#{contained['id']}"] = contained

    def __call__(self, reference: dict[str, Any] | None, kind: str) -> dict[str, Any]:
        target = (reference or {}).get("reference", "")
        resource = self.index.get(target)
        if resource is None and "/" in target:  # absolute URL to a relative id
            resource = self.index.get("/".join(target.rstrip("/").split("/")[-2:]))
        return resource if resource and resource.get("resourceType") == kind else {}


def parse(data: bytes) -> Report:
    """Read a Bundle (or a bare DiagnosticReport) into a report.

    :raises ReportFormatError: invalid JSON or FHIR, a code outside its value set, no
        DiagnosticReport, or a cancelled / entered-in-error report.
    """
    bundle = _load(data)
    entries = [e.get("resource") or {} for e in bundle.get("entry", [])]
    report = next((r for r in entries if r.get("resourceType") == "DiagnosticReport"), None)
    if report is None:
        raise ReportFormatError("the FHIR Bundle holds no DiagnosticReport")
    if report["status"] in REJECTED_STATUSES:
        raise ReportFormatError(f"the FHIR DiagnosticReport is {report['status']}, not a report")
    resolve = _Resolver(bundle, report)

    patient_resource = resolve(report.get("subject"), "Patient")
    identifiers = patient_resource.get("identifier") or []
    identifier = next(
        (
            i
            for i in identifiers
            if any(c.get("code") == "MR" for c in (i.get("type") or {}).get("coding", []))
        ),
        identifiers[0] if identifiers else {},
    )
    system = identifier.get("system") or ""
    issuer = (identifier.get("assigner") or {}).get("display") or (
        system[8:] if system.startswith("urn:oid:") else system
    )
    birth = patient_resource.get("birthDate")
    patient = Patient(
        name=_parse_name(patient_resource.get("name")),
        id=identifier.get("value") or "",
        issuer=issuer,
        birth_date=date.fromisoformat(birth) if birth and len(birth) == 10 else None,
        sex=GENDERS.get(patient_resource.get("gender", ""), ""),
    )

    study = next(
        (s for ref in report.get("imagingStudy", []) if (s := resolve(ref, "ImagingStudy"))),
        {},
    )
    study_uid, accession = "", ""
    for ident in study.get("identifier", []):
        codes = {c.get("code") for c in (ident.get("type") or {}).get("coding", [])}
        if ident.get("system") == DICOM_UID_SYSTEM:
            study_uid = (ident.get("value") or "").removeprefix("urn:oid:")
        elif "ACSN" in codes:
            accession = ident.get("value") or ""
    if study_uid and not is_valid_uid(study_uid):
        raise ReportFormatError("the FHIR ImagingStudy's study instance UID is not a valid UID")
    accession = accession or next(
        (
            i.get("value", "")
            for i in report.get("identifier", [])
            if "ACSN" in {c.get("code") for c in (i.get("type") or {}).get("coding", [])}
        ),
        "",
    )

    practitioner = next(
        (
            p
            for ref in report.get("resultsInterpreter", []) + report.get("performer", [])
            if (p := resolve(ref, "Practitioner"))
        ),
        {},
    )
    organization = next(
        (o for ref in report.get("performer", []) if (o := resolve(ref, "Organization"))), {}
    )
    findings = [
        obs.get("valueString", "")
        for ref in report.get("result", [])
        if (obs := resolve(ref, "Observation")) and "valueString" in obs
    ]
    return Report(
        patient=patient,
        accession_number=accession,
        study_instance_uid=study_uid,
        procedure=_procedure(study),
        author=Author(
            name=_parse_name(practitioner.get("name")),
            id=next((i.get("value", "") for i in practitioner.get("identifier", [])), ""),
        ),
        status=REPORT_STATUSES[report["status"]],
        findings="\n\n".join(findings),
        impression=report.get("conclusion") or "",
        observation_time=_parse_datetime(report.get("effectiveDateTime") or study.get("started")),
        report_time=_parse_datetime(report.get("issued")),
        attachments=_attachments(report),
        facility=organization.get("name") or "",
    )


def _procedure(study: dict[str, Any]) -> Code:
    concept: dict[str, Any] = next(iter(study.get("procedureCode") or []), {})
    coding: dict[str, Any] = next(iter(concept.get("coding") or []), {})
    return Code(
        code=coding.get("code") or "",
        display=concept.get("text") or coding.get("display") or "",
        system=coding.get("system") or "",
    )


def _attachments(report: dict[str, Any]) -> list[Attachment]:
    result = []
    for form in report.get("presentedForm", []):
        if "data" not in form:
            continue  # a URL only: emix fetches nothing a document points at
        try:
            data = base64.b64decode(form["data"], validate=True)
        except (binascii.Error, ValueError):
            raise ReportFormatError("a FHIR presentedForm holds invalid Base64") from None
        result.append(
            Attachment(
                media_type=form.get("contentType") or "application/octet-stream",
                data=data,
                title=form.get("title") or "",
            )
        )
    return result
