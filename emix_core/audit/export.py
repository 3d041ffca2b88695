"""Audit events in the standard shapes: DICOM PS3.15 A.5 audit messages and FHIR AuditEvent.

Both functions take one row as :meth:`emix_core.audit.chain.AuditLog.events` returns it
(with ``include_phi=True`` when patients and studies should be named in the export).
The output carries PHI when the row does: it is meant for an audit repository or an
auditor, never for a log file.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

from lxml import etree

__all__ = ["EVENT_TYPES", "DCM_SYSTEM", "to_dicom_audit_message", "to_fhir_audit_event"]

#: emix event type -> DICOM PS3.15 A.5.3 EventID (code, coding scheme, code meaning).
EVENT_TYPES: dict[str, tuple[str, str, str]] = {
    "application-activity": ("110100", "DCM", "Application Activity"),
    "begin-transferring": ("110102", "DCM", "Begin Transferring DICOM Instances"),
    "instances-accessed": ("110103", "DCM", "DICOM Instances Accessed"),
    "instances-transferred": ("110104", "DCM", "DICOM Instances Transferred"),
    "study-deleted": ("110105", "DCM", "DICOM Study Deleted"),
    "export": ("110106", "DCM", "Export"),
    "import": ("110107", "DCM", "Import"),
    "query": ("110112", "DCM", "Query"),
    "security-alert": ("110113", "DCM", "Security Alert"),
    "user-authentication": ("110114", "DCM", "User Authentication"),
}

#: FHIR system URI of the DICOM controlled terminology (coding scheme "DCM").
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
_ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
_OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
_SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
_PACKAGE_SYSTEM = "urn:emix:package"
_OUTCOME_TEXT = {0: "Success", 4: "Minor failure", 8: "Serious failure", 12: "Major failure"}


def _event_code(row: dict[str, Any]) -> tuple[str, str, str]:
    return EVENT_TYPES.get(row["event_type"], ("110100", "DCM", "Application Activity"))


def _network_type(source: str) -> str:
    """RFC 3881 network access point type: ``2`` an IP address, ``1`` a machine name."""
    try:
        ipaddress.ip_address(source)
    except ValueError:
        return "1"
    return "2"


def _participants(phi: dict[str, Any] | None) -> Iterator[tuple[str, str, str | None]]:
    """Patients and studies named in an event's PHI: ``(kind, id, name)``, without repeats.

    Understands ``patient_id``/``patient_name``/``study_uid`` at the top level and lists
    ``patients`` and ``studies`` of strings or of dicts with the same keys.
    """
    seen: set[tuple[str, str]] = set()

    def found(kind: str, ident: Any, name: Any = None) -> Iterator[tuple[str, str, str | None]]:
        if ident and (kind, str(ident)) not in seen:
            seen.add((kind, str(ident)))
            yield kind, str(ident), str(name) if name else None

    if not isinstance(phi, dict):
        return
    entries: list[dict[str, Any]] = [phi]
    for key, id_key in (("patients", "patient_id"), ("studies", "study_uid")):
        for entry in phi.get(key) or ():
            entries.append(entry if isinstance(entry, dict) else {id_key: entry})
    for entry in entries:
        yield from found("patient", entry.get("patient_id"), entry.get("patient_name"))
        yield from found("study", entry.get("study_uid"))


# --------------------------------------------------------------------------- DICOM


def _coded(parent: etree._Element, tag: str, code: str, scheme: str, meaning: str) -> None:
    etree.SubElement(
        parent, tag, {"csd-code": code, "codeSystemName": scheme, "originalText": meaning}
    )


def to_dicom_audit_message(row: dict[str, Any], *, audit_source_id: str = "emix") -> str:
    """One event as a DICOM PS3.15 A.5.1 ``AuditMessage`` (XML text, UTF-8 declared).

    :param row: an event from :meth:`~emix_core.audit.chain.AuditLog.events`.
    :param audit_source_id: ``AuditSourceID``: which emix node wrote the log.
    """
    message = etree.Element("AuditMessage")
    event = etree.SubElement(
        message,
        "EventIdentification",
        {
            "EventActionCode": row["action"],
            "EventDateTime": row["time"],
            "EventOutcomeIndicator": str(row["outcome"]),
        },
    )
    _coded(event, "EventID", *_event_code(row))
    if row.get("detail"):
        etree.SubElement(event, "EventOutcomeDescription").text = row["detail"]

    actor = etree.SubElement(message, "ActiveParticipant", {"UserID": row.get("actor") or "system"})
    actor.set("UserIsRequestor", "true")
    if row.get("source"):
        actor.set("NetworkAccessPointID", row["source"])
        actor.set("NetworkAccessPointTypeCode", _network_type(row["source"]))

    source = etree.SubElement(
        message, "AuditSourceIdentification", {"AuditSourceID": audit_source_id}
    )
    _coded(source, "AuditSourceTypeCode", "4", "DCM", "Application Server Process")

    for kind, ident, name in _participants(row.get("phi")):
        if kind == "patient":
            obj = etree.SubElement(
                message,
                "ParticipantObjectIdentification",
                {
                    "ParticipantObjectID": ident,
                    "ParticipantObjectTypeCode": "1",
                    "ParticipantObjectTypeCodeRole": "1",
                },
            )
            _coded(obj, "ParticipantObjectIDTypeCode", "2", "RFC-3881", "Patient Number")
            if name:
                etree.SubElement(obj, "ParticipantObjectName").text = name
        else:
            obj = etree.SubElement(
                message,
                "ParticipantObjectIdentification",
                {
                    "ParticipantObjectID": ident,
                    "ParticipantObjectTypeCode": "2",
                    "ParticipantObjectTypeCodeRole": "3",
                },
            )
            _coded(obj, "ParticipantObjectIDTypeCode", "110180", "DCM", "Study Instance UID")
    if row.get("package_id"):
        obj = etree.SubElement(
            message,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": row["package_id"],
                "ParticipantObjectTypeCode": "2",
                "ParticipantObjectTypeCodeRole": "20",
            },
        )
        _coded(obj, "ParticipantObjectIDTypeCode", "package", "emix", "emix package")
    return etree.tostring(message, encoding="UTF-8", xml_declaration=True).decode("utf-8")


# --------------------------------------------------------------------------- FHIR


def _entity(
    identifier: dict[str, Any], display: str | None, type_: tuple[str, str], role: tuple[str, str]
) -> dict[str, Any]:
    what: dict[str, Any] = {"identifier": identifier}
    if display:
        what["display"] = display
    return {
        "what": what,
        "type": {"system": _ENTITY_TYPE, "code": type_[0], "display": type_[1]},
        "role": {"system": _OBJECT_ROLE, "code": role[0], "display": role[1]},
    }


def to_fhir_audit_event(row: dict[str, Any], *, audit_source_id: str = "emix") -> dict[str, Any]:
    """One event as a FHIR R4 ``AuditEvent`` resource (a JSON-ready dict).

    :param row: an event from :meth:`~emix_core.audit.chain.AuditLog.events`.
    :param audit_source_id: shown as the observer of ``source``.
    """
    code, _scheme, meaning = _event_code(row)
    agent: dict[str, Any] = {
        "who": {"display": row.get("actor") or "system"},
        "requestor": True,
    }
    if row.get("source"):
        agent["network"] = {"address": row["source"], "type": _network_type(row["source"])}
    resource: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": {"system": DCM_SYSTEM, "code": code, "display": meaning},
        "action": row["action"],
        "recorded": row["time"],
        "outcome": str(row["outcome"]),
        "agent": [agent],
        "source": {
            "observer": {"display": audit_source_id},
            "type": [{"system": _SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
    }
    if row.get("detail"):
        resource["outcomeDesc"] = row["detail"]
    elif row["outcome"] in _OUTCOME_TEXT and row["outcome"]:
        resource["outcomeDesc"] = _OUTCOME_TEXT[row["outcome"]]
    entities = []
    for kind, ident, name in _participants(row.get("phi")):
        if kind == "patient":
            entities.append(_entity({"value": ident}, name, ("1", "Person"), ("1", "Patient")))
        else:
            study_id = {
                "type": {"coding": [{"system": DCM_SYSTEM, "code": "110180"}]},
                "system": "urn:dicom:uid",
                "value": f"urn:oid:{ident}",
            }
            entities.append(_entity(study_id, None, ("2", "System Object"), ("3", "Report")))
    if row.get("package_id"):
        package = {"system": _PACKAGE_SYSTEM, "value": row["package_id"]}
        entities.append(_entity(package, None, ("2", "System Object"), ("20", "Job")))
    if entities:
        resource["entity"] = entities
    return resource
