"""Reading the EMR's FHIR R4 server with the launch's access token, and finding the packages
received for the patient in context."""

from __future__ import annotations

import json
from typing import Any

import requests

from emix_core import (
    REPORT_MEDIA_TYPES,
    LaunchRejected,
    PackageContent,
    hub_hooks,
    readable_packages,
)

TIMEOUT = 15
#: Largest FHIR answer read, bytes (a search page of studies and reports).
MAX_ANSWER = 8 * 1024 * 1024
#: Resources listed per search.
PAGE = 50


class FhirReader:
    """GETs against one FHIR base with a bearer token (the token never leaves the hub)."""

    def __init__(self, base: str, access_token: str) -> None:
        self.base = base.rstrip("/")
        self.token = access_token

    def url(self, reference: str) -> str:
        """A reference (``Patient/1`` or an absolute URL on this server) as a URL."""
        if reference.startswith(("http://", "https://")):
            if not reference.startswith(self.base + "/"):
                raise LaunchRejected("the EMR named a resource on another server; not followed")
            return reference
        return f"{self.base}/{reference.lstrip('/')}"

    def read(self, reference: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        try:
            answer = requests.get(
                self.url(reference),
                params=params,
                headers={
                    "Accept": "application/fhir+json",
                    "Authorization": f"Bearer {self.token}",
                },
                timeout=TIMEOUT,
                stream=True,
            )
            body = answer.raw.read(MAX_ANSWER + 1, decode_content=True)
        except requests.RequestException as exc:
            raise LaunchRejected(
                f"the EMR's FHIR server did not answer ({type(exc).__name__})"
            ) from exc
        if answer.status_code in (401, 403):
            raise LaunchRejected(
                "the EMR refused the access token; launch emix again from the chart"
            )
        if answer.status_code != 200 or len(body) > MAX_ANSWER:
            raise LaunchRejected(f"the EMR's FHIR server answered HTTP {answer.status_code}")
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise LaunchRejected("the EMR's FHIR server did not answer with JSON") from exc
        if not isinstance(data, dict):
            raise LaunchRejected("the EMR's FHIR server did not answer with a resource")
        return data

    def create(self, resource: dict[str, Any]) -> str:
        """POST a resource; returns the id the server gave it (``Location`` or body)."""
        try:
            answer = requests.post(
                self.url(str(resource["resourceType"])),
                json=resource,
                headers={
                    "Accept": "application/fhir+json",
                    "Content-Type": "application/fhir+json",
                    "Authorization": f"Bearer {self.token}",
                },
                timeout=TIMEOUT,
            )
        except requests.RequestException as exc:
            raise LaunchRejected(
                f"the EMR's FHIR server did not answer ({type(exc).__name__})"
            ) from exc
        if answer.status_code in (401, 403):
            raise LaunchRejected(
                "the EMR did not allow emix to write to the chart; its administrator grants "
                "emix the scope patient/DocumentReference.c"
            )
        if answer.status_code not in (200, 201):
            raise LaunchRejected(f"the EMR's FHIR server answered HTTP {answer.status_code}")
        location = answer.headers.get("Location", "")
        return location.split(f"{resource['resourceType']}/")[-1].split("/")[0] if location else ""

    def search(self, resource_type: str, patient: str) -> list[dict[str, Any]]:
        """The first page of ``resource_type`` resources of a patient."""
        bundle = self.read(resource_type, {"patient": patient, "_count": str(PAGE)})
        return [
            e["resource"]
            for e in bundle.get("entry") or []
            if isinstance(e, dict)
            and isinstance(e.get("resource"), dict)
            and e["resource"].get("resourceType") == resource_type
        ]


def emails_of(resource: dict[str, Any]) -> list[str]:
    """The email addresses in a Practitioner's (or Person's) telecom."""
    return [
        str(t.get("value", "")).strip().lower()
        for t in resource.get("telecom") or []
        if isinstance(t, dict) and t.get("system") == "email" and t.get("value")
    ]


def patient_summary(patient: dict[str, Any]) -> dict[str, Any]:
    """Name, birth date, sex and identifiers of a FHIR Patient, for the page."""
    names = patient.get("name") or [{}]
    name = names[0] if isinstance(names[0], dict) else {}
    given = " ".join(name.get("given") or [])
    display = name.get("text") or ", ".join(p for p in (name.get("family"), given) if p)
    return {
        "name": display or "(no name)",
        "families": [
            str(n["family"]).strip()
            for n in names
            if isinstance(n, dict) and isinstance(n.get("family"), str) and n["family"].strip()
        ],
        "birth_date": patient.get("birthDate") or "",
        "sex": patient.get("gender") or "",
        "identifiers": [
            {"system": str(i.get("system") or ""), "value": str(i["value"])}
            for i in patient.get("identifier") or []
            if isinstance(i, dict) and i.get("value")
        ],
    }


def _dicom_date(value: str) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value) == 8 and value.isdigit() else ""


def _family(name: str) -> str:
    """The family name of a DICOM person name (``FAMILY^GIVEN``), folded for comparison."""
    return name.split("=")[0].split("^")[0].strip().casefold()


def _matches(summary: dict[str, Any], patient: dict[str, Any]) -> bool:
    """Whether a received study is of this patient, after the hub's reconciliation.

    A Patient ID is unique only inside the facility that gave it, so a study from another
    facility with the same ID may be of someone else: the ID must be one of the patient's
    identifiers *and* the study must name the same family name; a birth date on both sides
    must agree too.
    """
    foreign = {
        "PatientID": str(summary.get("patient_id") or ""),
        "IssuerOfPatientID": str(summary.get("issuer_of_patient_id") or ""),
        "PatientName": str(summary.get("patient_name") or ""),
        "PatientBirthDate": str(summary.get("patient_birth_date") or ""),
        "PatientSex": str(summary.get("patient_sex") or ""),
    }
    local = {**foreign, **hub_hooks().reconcile_patient(foreign, None, "smart")}
    ids = {i["value"] for i in patient["identifiers"]}
    if not local["PatientID"] or local["PatientID"] not in ids:
        return False
    family = _family(local.get("PatientName", ""))
    if not family or family not in {f.casefold() for f in patient.get("families", [])}:
        return False
    born = _dicom_date(local.get("PatientBirthDate", ""))
    return not (born and patient["birth_date"] and born != patient["birth_date"])


def received_for(patient: dict[str, Any], limit: int = 200) -> list[dict[str, Any]]:
    """Studies of packages the signed-in member may read whose patient is this one."""
    found = []
    for content in readable_packages(limit=limit):
        for uid, summary in content.studies.items():
            if _matches(summary, patient):
                found.append(_study_row(content, uid, summary))
    return found


def _study_row(content: PackageContent, uid: str, summary: dict[str, Any]) -> dict[str, Any]:
    reports = [
        {"item": i.id, "media_type": i.media_type}
        for i in content.items
        if i.media_type in REPORT_MEDIA_TYPES and i.study_uid in (None, "", uid)
    ]
    return {
        "reports": reports,
        "package": content.id,
        "sender": content.package.sender,
        "study_uid": uid,
        "date": _dicom_date(str(summary.get("study_date") or "")) or "—",
        "description": summary.get("study_description") or "(no description)",
        "modalities": ", ".join(summary.get("modalities") or []) or "—",
        "instances": summary.get("instances") or 0,
    }


def study_uid_of(imaging_study: dict[str, Any]) -> str:
    """The Study Instance UID of an ImagingStudy (identifier system ``urn:dicom:uid``)."""
    for identifier in imaging_study.get("identifier") or []:
        if isinstance(identifier, dict) and identifier.get("system") == "urn:dicom:uid":
            return str(identifier.get("value") or "").removeprefix("urn:oid:")
    return ""


def imaging_rows(studies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for s in studies:
        modalities = [m.get("code", "") for m in s.get("modality") or [] if isinstance(m, dict)]
        rows.append(
            {
                "id": str(s.get("id") or ""),
                "uid": study_uid_of(s),
                "started": str(s.get("started") or "")[:10] or "—",
                "description": s.get("description") or "(no description)",
                "modalities": ", ".join(m for m in modalities if m) or "—",
                "status": s.get("status") or "",
            }
        )
    return rows


def report_rows(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in reports:
        code = r.get("code") or {}
        rows.append(
            {
                "title": code.get("text")
                or next((c.get("display") for c in code.get("coding") or []), None)
                or "(report)",
                "issued": str(r.get("issued") or r.get("effectiveDateTime") or "")[:10] or "—",
                "status": r.get("status") or "",
                "conclusion": r.get("conclusion") or "",
            }
        )
    return rows
