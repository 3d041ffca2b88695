"""Identifiers of a report: stable, issued under the facility's own OID.

An EMR links a report by its identifiers: the document (CDA ``id``, FHIR
``DiagnosticReport.identifier``), the set its versions share (CDA ``setId``), the
document an amendment replaces, and, for HL7 v2, the message control id (MSH-10) an
interface engine de-duplicates on. emix never invents them at random: what the
report carries is used as is, and what it lacks is derived from what it says, so the
same report rendered twice (a retry, a re-delivery after a crash) gets the same ids.

Identifiers a facility issues are made under its OID (``[identifiers] facility_oid``
in ``emix.toml``), one arc per kind::

    <facility OID>.1   documents (document ids and set ids)
    <facility OID>.2   orders (accession numbers)
    <facility OID>.3   staff (the radiologist's id)
    <facility OID>.4   patients, when the patient id has no issuer of its own
    <facility OID>.5   visits (encounter numbers)

A facility that configured no OID gets one derived from its name (a UUID OID under
``2.25``, ISO/IEC 9834-8): unique to that name, never shared between facilities, but
an EMR team should register a real one.
"""

from __future__ import annotations

import hashlib
import uuid

from emix_core.reports.model import Identifier, Report

__all__ = [
    "DOCUMENTS",
    "ORDERS",
    "PATIENTS",
    "STAFF",
    "VISITS",
    "arc",
    "document_id",
    "facility_root",
    "message_control_id",
    "oid_for_facility",
    "set_id",
]

DOCUMENTS, ORDERS, STAFF, PATIENTS, VISITS = 1, 2, 3, 4, 5
_NAMESPACE = uuid.UUID("6f0e3c52-7d3b-4b8e-9a51-2f4c1e6b0a77")


def oid_for_facility(name: str) -> str:
    """The OID derived for a facility that registered none: ``2.25.<UUID of its name>``."""
    key = name.strip().casefold() or "unnamed facility"
    return f"2.25.{uuid.uuid5(_NAMESPACE, 'facility:' + key).int}"


def facility_root(report: Report) -> str:
    """The OID the report's facility issues identifiers under (configured or derived)."""
    return report.facility_oid or oid_for_facility(report.facility)


def arc(report: Report, kind: int) -> str:
    """The root of one kind of identifier the facility issues (``<oid>.<kind>``)."""
    return f"{facility_root(report)}.{kind}"


def _digest(*parts: str) -> str:
    text = "\x1f".join(parts)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _content_key(report: Report) -> str:
    """What the report says, for a report that carries no id of its own."""
    attachments = [hashlib.sha256(a.data).hexdigest() for a in report.attachments]
    author = report.author
    return _digest(
        report.patient.id,
        report.patient.issuer,
        report.patient.name.to_dicom(),
        report.accession_number,
        report.study_instance_uid,
        report.procedure.code,
        report.procedure.display,
        author.id if author else "",
        report.status,
        report.findings,
        report.impression,
        report.report_time.isoformat() if report.report_time else "",
        *attachments,
    )


def document_id(report: Report) -> Identifier:
    """The report's document id: its own, or one derived from its content."""
    if report.document_id:
        return report.document_id
    return Identifier(arc(report, DOCUMENTS), _content_key(report)[:32])


def set_id(report: Report) -> Identifier:
    """The id shared by every version of the report.

    Its own, else derived from the order it answers (accession number, study, patient),
    so a preliminary, final and amended report of one order share it; a report
    linked to no order is a set of its own.
    """
    if report.set_id:
        return report.set_id
    order = (report.accession_number, report.study_instance_uid, report.patient.id)
    key = _digest("set", *order) if any(order) else _digest("set", _content_key(report))
    return Identifier(arc(report, DOCUMENTS), "S" + key[:31])


def message_control_id(report: Report) -> str:
    """MSH-10 for the report: the same report sent again gets the same id.

    Derived from the document id and version, 20 characters (the v2.5.1 length).
    """
    identifier = document_id(report)
    return _digest("msh-10", identifier.root, identifier.extension, str(report.version))[:20]
