"""Saving a received report to the patient's chart as a FHIR R4 DocumentReference."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from emix_core import InvalidInput, PackageContent, utcnow

#: Largest report written back, bytes (the DocumentReference carries it inline).
MAX_REPORT = 20 * 1024 * 1024
#: LOINC 18748-4 "Diagnostic imaging study" (the document type of an imaging report).
IMAGING_REPORT = {
    "system": "http://loinc.org",
    "code": "18748-4",
    "display": "Diagnostic imaging study",
}


def read_report(content: PackageContent, item_id: int) -> tuple[Any, bytes]:
    """The report item and its bytes (decrypted and checked segment by segment)."""
    item = next((i for i in content.items if i.id == item_id), None)
    if item is None or item.size > MAX_REPORT:
        raise InvalidInput("this report cannot be saved to the chart (missing or too large)")
    data = b"".join(content.read_item(item_id))
    return item, data


def document_reference(
    patient: str, content: PackageContent, item: Any, data: bytes, study_uids: list[str]
) -> dict[str, Any]:
    """A current DocumentReference for the patient, the report inline, its studies named."""
    sha1 = hashlib.sha1(data, usedforsecurity=False).digest()  # FHIR's Attachment.hash
    return {
        "resourceType": "DocumentReference",
        "status": "current",
        "docStatus": "final",
        "type": {"coding": [IMAGING_REPORT], "text": "Imaging report received through emix"},
        "category": [{"text": "Imaging"}],
        "subject": {"reference": f"Patient/{patient}"},
        "date": utcnow().isoformat(timespec="seconds"),
        "description": f"Report received from {content.package.sender} through emix",
        "content": [
            {
                "attachment": {
                    "contentType": item.media_type,
                    "data": base64.b64encode(data).decode("ascii"),
                    "size": len(data),
                    "hash": base64.b64encode(sha1).decode("ascii"),
                    "title": "Imaging report",
                }
            }
        ],
        "context": {
            "related": [
                {"identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}}
                for uid in study_uids
            ]
        },
    }
