"""Audit events in the standard shapes: DICOM PS3.15 A.5 audit messages and FHIR AuditEvent.

Both functions take one row as :meth:`emix_core.audit.chain.AuditLog.events` returns it
(with ``include_phi=True`` when patients and studies should be named in the export).
The output carries PHI when the row does: it is meant for an audit repository or an
auditor, never for a log file.
"""

from __future__ import annotations

import base64
import ipaddress
import json
from collections.abc import Iterator
from datetime import UTC
from typing import TYPE_CHECKING, Any

from lxml import etree

from emix_core.errors import InvalidInput

if TYPE_CHECKING:
    from emix_core.model import AuditEvent

__all__ = [
    "ACTION_CODES",
    "DCM_SYSTEM",
    "EVENT_TYPES",
    "action_code",
    "event_row",
    "event_type_code",
    "to_dicom_audit_message",
    "to_dicom_audit_messages",
    "to_fhir_audit_event",
]

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


def event_row(event: AuditEvent) -> dict[str, Any]:
    """An :class:`~emix_core.model.AuditEvent` as a row of
    :meth:`~emix_core.audit.chain.AuditLog.events` (``include_phi=True``, no ``seq``), for
    forwarders that export events as they happen."""
    moment = event.time if event.time.tzinfo else event.time.replace(tzinfo=UTC)
    return {
        "time": moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "event_type": event.event_type,
        "action": str(event.action),
        "outcome": int(event.outcome),
        "actor": event.actor,
        "source": event.source,
        "package_id": event.package_id,
        "phi": dict(event.phi),
        "detail": event.detail,
    }


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

#: PS3.15 A.5.3: the EventActionCode each event allows; the first is used when the row's
#: action is not among them (e.g. a ``begin-transferring`` recorded with ``R``).
ACTION_CODES: dict[str, str] = {
    "application-activity": "E",
    "begin-transferring": "E",
    "instances-accessed": "RCUD",
    "instances-transferred": "RCU",
    "study-deleted": "D",
    "export": "R",
    "import": "C",
    "query": "E",
    "security-alert": "E",
    "user-authentication": "E",
}

#: Events that move instances between two nodes: they carry Source and Destination.
_TRANSFERS = frozenset({"begin-transferring", "instances-transferred", "export", "import"})
_SOURCE_ROLE = ("110153", "DCM", "Source Role ID")
_DESTINATION_ROLE = ("110152", "DCM", "Destination Role ID")
_LOGIN = ("110122", "DCM", "Login")
_LOGOUT = ("110123", "DCM", "Logout")
_STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"

#: Security Alert EventTypeCode (PS3.15 A.5.3.11, CID 403), chosen by words of the detail;
#: the first match wins, ``Security Configuration`` when none does.
_ALERT_TYPES: tuple[tuple[tuple[str, ...], tuple[str, str, str]], ...] = (
    (("sign-in", "login", "token", "throttl"), ("110126", "DCM", "Node Authentication")),
    (("signing key", "certificate", "key"), ("110129", "DCM", "Security Configuration")),
    (("member", "facility", "role"), ("110137", "DCM", "User Security Attributes Changed")),
    (
        ("legal hold", "retention", "tamper"),
        ("110135", "DCM", "Object Security Attributes Changed"),
    ),
    (("audit",), ("110133", "DCM", "Audit Recording Stopped")),
)


def action_code(row: dict[str, Any]) -> str:
    """The EventActionCode PS3.15 A.5.3 allows for the row's event (the row's own if allowed)."""
    allowed = ACTION_CODES.get(row["event_type"], "CRUDE")
    return row["action"] if row["action"] in allowed else allowed[0]


def event_type_code(row: dict[str, Any]) -> tuple[str, str, str] | None:
    """EventTypeCode where PS3.15 asks for one: login/logout and the kind of security alert."""
    detail = (row.get("detail") or "").lower()
    if row["event_type"] == "user-authentication":
        return _LOGOUT if "logout" in detail or "sign-out" in detail else _LOGIN
    if row["event_type"] == "security-alert":
        for words, code in _ALERT_TYPES:
            if any(word in detail for word in words):
                return code
        return ("110129", "DCM", "Security Configuration")
    return None


def _coded(parent: etree._Element, tag: str, code: str, scheme: str, meaning: str) -> None:
    etree.SubElement(
        parent, tag, {"csd-code": code, "codeSystemName": scheme, "originalText": meaning}
    )


def _participant(
    message: etree._Element,
    user_id: str,
    *,
    requestor: bool,
    address: str = "",
    role: tuple[str, str, str] | None = None,
) -> None:
    node = etree.SubElement(
        message,
        "ActiveParticipant",
        {"UserID": user_id, "UserIsRequestor": "true" if requestor else "false"},
    )
    if address:
        node.set("NetworkAccessPointID", address)
        node.set("NetworkAccessPointTypeCode", _network_type(address))
    if role:
        _coded(node, "RoleIDCode", *role)


def _active_participants(message: etree._Element, row: dict[str, Any], node_id: str) -> None:
    """The requestor, this node and, for a transfer, its Source and Destination (A.5.3)."""
    actor = row.get("actor") or "system"
    remote = row.get("source") or ""
    event = row["event_type"]
    person = actor not in ("system", node_id)
    if person:  # the person or service that asked
        _participant(message, actor, requestor=True, address=remote)
    if event in _TRANSFERS:
        # This node sends unless it receives (import, or a transfer it creates).
        receives = event == "import" or (
            event == "instances-transferred" and action_code(row) == "C"
        )
        peer = remote or "unknown"
        here = (node_id, not person, "", None)
        there = (peer, False, remote, None)
        source, destination = (there, here) if receives else (here, there)
        _participant(message, source[0], requestor=source[1], address=source[2], role=_SOURCE_ROLE)
        _participant(
            message,
            destination[0],
            requestor=destination[1],
            address=destination[2],
            role=_DESTINATION_ROLE,
        )
    else:  # the node that did or saw it (the authenticating node, the alert's reporter)
        _participant(message, node_id, requestor=not person, address="" if person else remote)


def _patient_object(message: etree._Element, ident: str, name: str | None) -> None:
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


def _study_object(message: etree._Element, uid: str) -> None:
    obj = etree.SubElement(
        message,
        "ParticipantObjectIdentification",
        {
            "ParticipantObjectID": uid,
            "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "3",
        },
    )
    _coded(obj, "ParticipantObjectIDTypeCode", "110180", "DCM", "Study Instance UID")


def _other_objects(message: etree._Element, row: dict[str, Any]) -> None:
    phi = row.get("phi") if isinstance(row.get("phi"), dict) else {}
    query = phi.get("query") if phi else None
    if row["event_type"] == "query" and query:
        obj = etree.SubElement(
            message,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": _STUDY_ROOT_FIND,
                "ParticipantObjectTypeCode": "2",
                "ParticipantObjectTypeCodeRole": "3",
            },
        )
        _coded(obj, "ParticipantObjectIDTypeCode", "110181", "DCM", "SOP Class UID")
        text = json.dumps(query, sort_keys=True, ensure_ascii=False, default=str)
        etree.SubElement(obj, "ParticipantObjectQuery").text = base64.b64encode(
            text.encode("utf-8")
        ).decode("ascii")
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


def _per_patient(phi: Any) -> list[tuple[tuple[str, str | None] | None, list[str]]]:
    """Split the PHI into groups of one patient and that patient's studies (PS3.15 A.5.3).

    A study that names its ``patient_id`` goes with that patient. Studies that name none
    go with the only patient when there is one, else into a group of their own.
    """
    patients: dict[str, str | None] = {}
    studies: dict[str | None, list[str]] = {}
    for kind, ident, name in _participants(phi):
        if kind == "patient":
            patients.setdefault(ident, name)
    for kind, ident, owner in _study_owners(phi):
        if kind == "study":
            studies.setdefault(owner, [])
            if ident not in studies[owner]:
                studies[owner].append(ident)
    loose = studies.pop(None, [])
    groups: list[tuple[tuple[str, str | None] | None, list[str]]] = []
    for ident, name in patients.items():
        own = studies.pop(ident, [])
        if len(patients) == 1:
            own = own + [s for s in loose if s not in own]
            loose = []
        groups.append(((ident, name), own))
    for owner, own in studies.items():  # a study names a patient the PHI does not list
        if owner is not None:
            groups.append(((owner, None), own))
    if loose or not groups:
        groups.append((None, loose))
    return groups


def _study_owners(phi: Any) -> Iterator[tuple[str, str, str | None]]:
    if not isinstance(phi, dict):
        return
    if phi.get("study_uid"):
        yield "study", str(phi["study_uid"]), _str_or_none(phi.get("patient_id"))
    for entry in phi.get("studies") or ():
        if isinstance(entry, dict):
            if entry.get("study_uid"):
                yield "study", str(entry["study_uid"]), _str_or_none(entry.get("patient_id"))
        elif entry:
            yield "study", str(entry), None


def _str_or_none(value: Any) -> str | None:
    return str(value) if value else None


def to_dicom_audit_messages(
    row: dict[str, Any], *, audit_source_id: str = "emix", enterprise_site_id: str = ""
) -> list[str]:
    """One event as DICOM PS3.15 A.5.1 ``AuditMessage`` s, one per patient (XML texts).

    PS3.15 A.5.3 lets a message name a single patient: an event about several patients
    becomes one message per patient, each with that patient's studies.

    :param row: an event from :meth:`~emix_core.audit.chain.AuditLog.events`.
    :param audit_source_id: ``AuditSourceID``: which emix node wrote the log.
    :param enterprise_site_id: ``AuditEnterpriseSiteID`` (e.g. the facility's address).
    """
    return [
        _message(row, patient, studies, audit_source_id, enterprise_site_id)
        for patient, studies in _per_patient(row.get("phi"))
    ]


def to_dicom_audit_message(row: dict[str, Any], *, audit_source_id: str = "emix") -> str:
    """One event about at most one patient as a DICOM PS3.15 A.5.1 ``AuditMessage``.

    :raises InvalidInput: the event names several patients; use
        :func:`to_dicom_audit_messages`.
    """
    messages = to_dicom_audit_messages(row, audit_source_id=audit_source_id)
    if len(messages) != 1:
        raise InvalidInput(
            f"audit event {row.get('seq', '')} names {len(messages)} patients; PS3.15 wants "
            "one message per patient (use to_dicom_audit_messages)"
        )
    return messages[0]


def _message(
    row: dict[str, Any],
    patient: tuple[str, str | None] | None,
    studies: list[str],
    audit_source_id: str,
    enterprise_site_id: str,
) -> str:
    message = etree.Element("AuditMessage")
    event = etree.SubElement(
        message,
        "EventIdentification",
        {
            "EventActionCode": action_code(row),
            "EventDateTime": row["time"],
            "EventOutcomeIndicator": str(row["outcome"]),
        },
    )
    _coded(event, "EventID", *_event_code(row))
    type_code = event_type_code(row)
    if type_code:
        _coded(event, "EventTypeCode", *type_code)
    if row.get("detail"):
        etree.SubElement(event, "EventOutcomeDescription").text = row["detail"]

    _active_participants(message, row, audit_source_id)

    source = etree.SubElement(
        message, "AuditSourceIdentification", {"AuditSourceID": audit_source_id}
    )
    if enterprise_site_id:
        source.set("AuditEnterpriseSiteID", enterprise_site_id)
    _coded(source, "AuditSourceTypeCode", "4", "DCM", "Application Server Process")

    for uid in studies:
        _study_object(message, uid)
    if patient is not None:
        _patient_object(message, *patient)
    _other_objects(message, row)
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
        "action": action_code(row),
        "recorded": row["time"],
        "outcome": str(row["outcome"]),
        "agent": [agent],
        "source": {
            "observer": {"display": audit_source_id},
            "type": [{"system": _SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
    }
    subtype = event_type_code(row)
    if subtype:
        resource["subtype"] = [{"system": DCM_SYSTEM, "code": subtype[0], "display": subtype[2]}]
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
