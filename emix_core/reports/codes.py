"""Code systems and identifiers as each report format spells them.

The model keeps a code system as its FHIR URI; HL7 v2 writes a short name (table
0396), CDA an OID. Systems outside this table travel best effort: an OID as
``urn:oid:...``, anything else as given.
"""

from __future__ import annotations

import re
import uuid
from typing import NamedTuple

__all__ = [
    "CodeSystem",
    "CODE_SYSTEMS",
    "EMIX_LOCAL_OID",
    "LOINC",
    "is_oid",
    "system_from_hl7",
    "system_from_oid",
    "system_to_hl7",
    "system_to_oid",
]


class CodeSystem(NamedTuple):
    uri: str
    hl7: str
    oid: str


LOINC = CodeSystem("http://loinc.org", "LN", "2.16.840.1.113883.6.1")
CODE_SYSTEMS: tuple[CodeSystem, ...] = (
    LOINC,
    CodeSystem("http://snomed.info/sct", "SCT", "2.16.840.1.113883.6.96"),
    CodeSystem("http://www.radlex.org", "RADLEX", "2.16.840.1.113883.6.256"),
    CodeSystem("http://dicom.nema.org/resources/ontology/DCM", "DCM", "1.2.840.10008.2.16.4"),
    CodeSystem("http://www.ama-assn.org/go/cpt", "C4", "2.16.840.1.113883.6.12"),
)

#: Root for identifiers emix writes without an issuer of their own (a UUID-derived
#: OID, ISO/IEC 9834-8): local codes, accession numbers, author and document ids.
EMIX_LOCAL_OID = "2.25." + str(uuid.UUID("6f0e3c52-7d3b-4b8e-9a51-2f4c1e6b0a77").int)

_OID_RE = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")


def is_oid(value: str) -> bool:
    """True for a dotted-decimal ISO object identifier."""
    return len(value) <= 64 and bool(_OID_RE.match(value))


def system_to_hl7(system: str) -> str:
    """The HL7 v2 coding-system name (``L`` for a local code)."""
    for known in CODE_SYSTEMS:
        if system == known.uri:
            return known.hl7
    if not system:
        return "L"
    return system if len(system) <= 20 and ":" not in system else "L"


def system_from_hl7(name: str) -> str:
    """The model's system for an HL7 v2 coding-system name."""
    for known in CODE_SYSTEMS:
        if name.upper() == known.hl7:
            return known.uri
    return "" if name in ("", "L", "99LOCAL") else name


def system_to_oid(system: str) -> str:
    """The CDA ``codeSystem`` OID (emix's local root for a local code)."""
    for known in CODE_SYSTEMS:
        if system == known.uri:
            return known.oid
    if system.startswith("urn:oid:") and is_oid(system[8:]):
        return system[8:]
    return EMIX_LOCAL_OID


def system_from_oid(oid: str, name: str = "") -> str:
    """The model's system for a CDA ``codeSystem`` (and ``codeSystemName``)."""
    for known in CODE_SYSTEMS:
        if oid == known.oid:
            return known.uri
    if oid == EMIX_LOCAL_OID or not oid:
        return name
    return f"urn:oid:{oid}"
