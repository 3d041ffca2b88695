"""FHIR R4: a ``transaction`` Bundle a FHIR server accepts in one POST to its base URL.

Written, each entry ``POST`` with a ``urn:uuid:`` fullUrl that the server rewrites to
the id it assigns, and an ``ifNoneExist`` on the resource's identifier where it has
one (so a patient the EMR knows is linked, not duplicated, and the same report posted
twice creates nothing the second time):

- Patient (identifier type MR; system the issuer's OID, else the facility's patients
  arc; issuer name as ``assigner.display``);
- Organization (the facility, identified by its OID), Practitioner (the radiologist,
  ``resultsInterpreter``), Encounter (the visit, when known);
- ImagingStudy (study instance UID as ``urn:dicom:uid``, accession number as an ACSN
  identifier, procedure code, start time), when a study, order or procedure is known;
- Observation (the findings, LOINC 18782-3);
- Binary (each attachment), referenced from ``presentedForm`` and from a
  DocumentReference (``masterIdentifier`` the document id, ``relatesTo`` ``replaces``
  the document an amendment replaces);
- DiagnosticReport (identifiers: the document id ``official``, the set id
  ``secondary``; status, LOINC 18748-4, ``conclusion`` = impression).

Read back: this layout, the older ``collection`` Bundle and a bare DiagnosticReport.
Validated with fhir.resources' R4B models (the same structures as R4 for these
resources). fhir.resources checks structure but not code values, so status, gender,
bundle type and transaction requests are checked here, on the way in and out.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import uuid
from datetime import date, datetime
from typing import Any
from urllib.parse import quote

from emix_core.errors import ReportFormatError
from emix_core.reports import identity
from emix_core.reports.codes import LOINC, is_oid
from emix_core.reports.model import (
    PATIENT_CLASSES,
    Attachment,
    Author,
    Code,
    Identifier,
    Patient,
    PersonName,
    Report,
    is_valid_uid,
)

__all__ = ["MEDIA_TYPE", "parse", "render", "validate"]

MEDIA_TYPE = "application/fhir+json"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
V2_0004 = "http://terminology.hl7.org/CodeSystem/v2-0004"
URI_SYSTEM = "urn:ietf:rfc:3986"
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
HTTP_VERBS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"}
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


def _uri(root: str) -> str:
    """An OID or UUID as a URI (``urn:oid:...``, ``urn:uuid:...``)."""
    return f"urn:oid:{root}" if is_oid(root) else f"urn:uuid:{root.lower()}"


def _identifier(identifier: Identifier, use: str = "") -> dict[str, Any]:
    """An II as a FHIR Identifier: root as the system, extension as the value."""
    if identifier.extension:
        return {"use": use, "system": _uri(identifier.root), "value": identifier.extension}
    return {"use": use, "system": URI_SYSTEM, "value": _uri(identifier.root)}


def _from_identifier(identifier: dict[str, Any]) -> Identifier:
    system, value = identifier.get("system") or "", identifier.get("value") or ""
    if system == URI_SYSTEM:
        system, value = value, ""
    for prefix in ("urn:oid:", "urn:uuid:"):
        if system.startswith(prefix):
            try:
                return Identifier(system[len(prefix) :], value)
            except ReportFormatError:
                return Identifier()
    return Identifier()


class _Transaction:
    """Entries of a transaction Bundle: each a conditional create where it can be."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    def add(self, resource: dict[str, Any], if_none_exist: dict[str, Any] | None) -> str:
        """Add a resource (POST), created only if no resource has that identifier."""
        url = f"urn:uuid:{_uuid()}"
        request: dict[str, Any] = {"method": "POST", "url": resource["resourceType"]}
        if if_none_exist and if_none_exist.get("value"):
            system, value = if_none_exist.get("system", ""), if_none_exist["value"]
            request["ifNoneExist"] = "identifier=" + quote(f"{system}|{value}", safe=":/.|")
        self.entries.append({"fullUrl": url, "resource": resource, "request": request})
        return url


def render(report: Report) -> bytes:
    """Render a FHIR R4 transaction Bundle (JSON, UTF-8) and validate it.

    Every resource is a conditional create (``ifNoneExist`` on its identifier) where
    it has one, so the same report posted twice creates nothing the second time, and
    a patient the EMR knows is linked, not duplicated.
    """
    status = report.status
    bundle = _Transaction()
    document = identity.document_id(report)

    patient = report.patient
    patient_system = (
        f"urn:oid:{patient.issuer}"
        if is_oid(patient.issuer)
        else f"urn:oid:{identity.arc(report, identity.PATIENTS)}"
    )
    patient_id: dict[str, Any] = {
        "use": "usual",
        "type": {"coding": [{"system": V2_0203, "code": "MR"}]},
        "system": patient_system,
        "value": patient.id,
        "assigner": {"display": "" if is_oid(patient.issuer) else patient.issuer},
    }
    subject = {
        "reference": bundle.add(
            {
                "resourceType": "Patient",
                "identifier": [patient_id] if patient.id else [],
                "name": [_human_name(patient.name)],
                "gender": _GENDER_TO_FHIR.get(patient.sex),
                "birthDate": patient.birth_date.isoformat() if patient.birth_date else None,
            },
            patient_id if patient.id else None,
        )
    }
    performer: list[dict[str, Any]] = []
    if report.facility or report.facility_oid:
        organization_id = {"system": URI_SYSTEM, "value": _uri(identity.facility_root(report))}
        resource: dict[str, Any] = {
            "resourceType": "Organization",
            "identifier": [organization_id],
            "name": report.facility,
        }
        performer.append({"reference": bundle.add(resource, organization_id)})
    interpreter: list[dict[str, Any]] = []
    if report.author:
        author_id = {}
        if report.author.id:
            author_id = {
                "system": f"urn:oid:{identity.arc(report, identity.STAFF)}",
                "value": report.author.id,
            }
        resource = {
            "resourceType": "Practitioner",
            "identifier": [author_id],
            "name": [_human_name(report.author.name)],
        }
        interpreter.append({"reference": bundle.add(resource, author_id or None)})
    encounter = None
    if report.visit_number:
        visit_id = {
            "system": f"urn:oid:{identity.arc(report, identity.VISITS)}",
            "value": report.visit_number,
        }
        resource = {
            "resourceType": "Encounter",
            "identifier": [visit_id],
            "status": "unknown",
            "class": {"system": V2_0004, "code": report.patient_class},
            "subject": subject,
        }
        encounter = {"reference": bundle.add(resource, visit_id)}
    studies: list[dict[str, Any]] = []
    if report.study_instance_uid or report.accession_number or report.procedure:
        study_ids: list[dict[str, Any]] = []
        if report.study_instance_uid:
            study_ids.append(
                {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{report.study_instance_uid}"}
            )
        if report.accession_number:
            study_ids.append(
                {
                    "type": {"coding": [{"system": V2_0203, "code": "ACSN"}]},
                    "system": f"urn:oid:{identity.arc(report, identity.ORDERS)}",
                    "value": report.accession_number,
                }
            )
        resource = {
            "resourceType": "ImagingStudy",
            "status": "available" if report.study_instance_uid else "unknown",
            "subject": subject,
            "encounter": encounter,
            "identifier": study_ids,
            "started": _iso(report.observation_time),
            "procedureCode": [_coding(report.procedure)] if report.procedure else [],
        }
        studies.append({"reference": bundle.add(resource, next(iter(study_ids), None))})
    results: list[dict[str, Any]] = []
    if report.findings:
        findings_value = f"{document.extension}-findings" if document.extension else "findings"
        findings_id = {"system": _uri(document.root), "value": findings_value}
        resource = {
            "resourceType": "Observation",
            "identifier": [findings_id],
            "status": status,
            "code": {
                "coding": [{"system": LOINC.uri, "code": FINDINGS_CODE, "display": "Findings"}]
            },
            "subject": subject,
            "encounter": encounter,
            "effectiveDateTime": _iso(report.observation_time),
            "valueString": report.findings,
        }
        results.append({"reference": bundle.add(resource, findings_id)})
    forms = []
    for attachment in report.attachments:
        binary: dict[str, Any] = {
            "resourceType": "Binary",
            "contentType": attachment.media_type,
            "data": base64.b64encode(attachment.data).decode("ascii"),
        }
        forms.append(
            {
                "contentType": attachment.media_type,
                "url": bundle.add(binary, None),
                "size": len(attachment.data),
                "hash": base64.b64encode(hashlib.sha1(attachment.data).digest()).decode(),
                "title": attachment.title,
            }
        )
    report_ids = [
        _identifier(document, "official"),
        _identifier(identity.set_id(report), "secondary"),
    ]
    diagnostic_report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": report_ids,
        "status": status,
        "category": [{"coding": [{"system": V2_0074, "code": "RAD", "display": "Radiology"}]}],
        "code": {
            "coding": [
                {"system": LOINC.uri, "code": "18748-4", "display": "Diagnostic imaging study"}
            ]
        },
        "subject": subject,
        "encounter": encounter,
        "effectiveDateTime": _iso(report.observation_time),
        "issued": _iso(report.report_time),
        "performer": performer,
        "resultsInterpreter": interpreter,
        "result": results,
        "imagingStudy": studies,
        "conclusion": report.impression,
        "presentedForm": forms,
    }
    report_url = bundle.add(diagnostic_report, report_ids[0])
    if forms:
        relates = []
        if report.replaces:
            relates.append(
                {"code": "replaces", "target": {"identifier": _identifier(report.replaces)}}
            )
        reference: dict[str, Any] = {
            "resourceType": "DocumentReference",
            "masterIdentifier": _identifier(document),
            "identifier": [_identifier(identity.set_id(report), "secondary")],
            "status": "current",
            "docStatus": "amended" if status == "amended" else status,
            "type": diagnostic_report["code"],
            "category": diagnostic_report["category"],
            "subject": subject,
            "date": _iso(report.report_time),
            "author": interpreter + performer,
            "custodian": performer[0] if performer else None,
            "relatesTo": relates,
            "content": [{"attachment": form} for form in forms],
            "context": {
                "encounter": [encounter] if encounter else [],
                "related": [{"reference": report_url}],
            },
        }
        master = reference["masterIdentifier"]
        bundle.add(reference, {"system": master["system"], "value": master["value"]})
    result = _drop_empty(
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "timestamp": datetime.now().astimezone().replace(microsecond=0).isoformat(),
            "entry": bundle.entries,
        }
    )
    validate(result)
    return json.dumps(result, ensure_ascii=False, indent=2).encode("utf-8")


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
    transaction = bundle.get("type") in ("transaction", "batch")
    for entry in bundle.get("entry", []):
        request = entry.get("request") or {}
        if transaction and request.get("method") not in HTTP_VERBS:
            raise ReportFormatError(
                "a FHIR transaction entry needs request.method (GET, POST, PUT, PATCH, DELETE)"
            )

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
    organization = next(
        (o for ref in report.get("performer", []) if (o := resolve(ref, "Organization"))), {}
    )
    facility_oid = next(
        (
            i.root
            for i in map(_from_identifier, organization.get("identifier") or [])
            if i and is_oid(i.root) and not i.extension
        ),
        "",
    )
    system = identifier.get("system") or ""
    if facility_oid and system == f"urn:oid:{facility_oid}.{identity.PATIENTS}":
        system = ""  # the facility's own patient ids: no issuer was named
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
        attachments=_attachments(report, resolve),
        facility=organization.get("name") or "",
        facility_oid=facility_oid if len(facility_oid) <= 64 else "",
        **_encounter(resolve(report.get("encounter"), "Encounter")),
        **_identifiers(report, [e.get("resource") or {} for e in bundle.get("entry", [])]),
    )


def _encounter(encounter: dict[str, Any]) -> dict[str, Any]:
    visit = next((i.get("value") for i in encounter.get("identifier") or [] if i.get("value")), "")
    if not visit:
        return {}
    code = str((encounter.get("class") or {}).get("code") or "").upper()
    return {"visit_number": visit, "patient_class": code if code in PATIENT_CLASSES else ""}


def _identifiers(report: dict[str, Any], resources: list[dict[str, Any]]) -> dict[str, Any]:
    """Document id and set id of the DiagnosticReport; what its DocumentReference replaces."""
    ids = report.get("identifier") or []
    official = [i for i in ids if i.get("use") in (None, "official", "usual")]
    secondary = [i for i in ids if i.get("use") == "secondary"]
    result: dict[str, Any] = {}
    document = next((d for d in map(_from_identifier, official) if d), Identifier())
    if document:
        result["document_id"] = document
    set_id = next((d for d in map(_from_identifier, secondary) if d), Identifier())
    if set_id:
        result["set_id"] = set_id
    for resource in resources:
        if resource.get("resourceType") != "DocumentReference":
            continue
        for relation in resource.get("relatesTo") or []:
            target = (relation.get("target") or {}).get("identifier") or {}
            if relation.get("code") == "replaces" and (replaced := _from_identifier(target)):
                result["replaces"] = replaced
    return result


def _procedure(study: dict[str, Any]) -> Code:
    concept: dict[str, Any] = next(iter(study.get("procedureCode") or []), {})
    coding: dict[str, Any] = next(iter(concept.get("coding") or []), {})
    return Code(
        code=coding.get("code") or "",
        display=concept.get("text") or coding.get("display") or "",
        system=coding.get("system") or "",
    )


def _attachments(report: dict[str, Any], resolve: _Resolver) -> list[Attachment]:
    result = []
    for form in report.get("presentedForm", []):
        encoded = form.get("data")
        if encoded is None and form.get("url"):  # a Binary of the same Bundle
            encoded = resolve({"reference": form["url"]}, "Binary").get("data")
        if encoded is None:
            continue  # a URL only: emix fetches nothing a document points at
        try:
            data = base64.b64decode(encoded, validate=True)
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
