"""CDA R2 in the shape of a Diagnostic Imaging Report (HL7 DIR, DICOM PS3.20).

Header: ``recordTarget`` (patient), ``author`` (radiologist and facility),
``custodian`` (facility), ``legalAuthenticator`` (present once the report is final),
``inFulfillmentOf/order/id`` (accession number), ``documentationOf/serviceEvent``
(study instance UID as ``id/@root``, procedure code, observation time),
``relatedDocument[@typeCode='RPLC']`` for an amended report. Body: a Findings
section (DCM 121070), an Impression section (DCM 121072), and an Attachments
section whose ``observationMedia`` entries carry documents in Base64.

Reading is hostile-input safe: no DOCTYPE is accepted at all (so no entity, no
external DTD, no billion laughs), the parser resolves no entity, loads no DTD,
touches no network and keeps libxml2's size limits (``huge_tree`` off: a text node
over 10 MB, such as a Base64 attachment above ~7 MB, is refused).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any, NamedTuple

from lxml import etree

from emix_core.errors import ReportFormatError
from emix_core.reports import identity
from emix_core.reports.codes import (
    EMIX_LOCAL_OID,
    LOINC,
    is_oid,
    system_from_oid,
    system_to_oid,
)
from emix_core.reports.dtm import format_date, format_ts, parse_date, parse_ts
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

__all__ = ["MEDIA_TYPE", "NS", "parse", "render"]

MEDIA_TYPE = "application/cda+xml"
NS = "urn:hl7-org:v3"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
_V = f"{{{NS}}}"
DIR_TEMPLATE = "2.16.840.1.113883.10.20.6"
DCM_OID = "1.2.840.10008.2.16.4"
#: The realm (``UV``: universal, no national header profile claimed).
REALM = "UV"
DEFAULT_LANGUAGE = "en-US"
#: HL7 v2 table 0004 (patient class), as CDA writes an encounter's code.
PATIENT_CLASS_OID = "2.16.840.1.113883.12.4"


class Section(NamedTuple):
    """A body section: its template, code and title."""

    template: str
    code: str
    system: str
    system_name: str
    title: str


#: DIR Findings section (HL7 CDA DIR, 2.16.840.1.113883.10.20.6.1.2; DICOM PS3.20).
FINDINGS = Section("2.16.840.1.113883.10.20.6.1.2", "121070", DCM_OID, "DCM", "Findings")
#: DICOM PS3.20 Impression section (1.2.840.10008.9.5).
IMPRESSION = Section("1.2.840.10008.9.5", "19005-8", LOINC.oid, "LOINC", "Impressions")
_FINDINGS_CODES = {"121070", "18782-3", "59776-5"}
_IMPRESSION_CODES = {"121072", "19005-8"}
#: Largest attachment a CDA document carries: its Base64 must stay under libxml2's
#: 10,000,000-byte text node limit, which emix's parser keeps (``huge_tree`` off).
MAX_ATTACHMENT_BYTES = 7_400_000
_IMPRESSION_TITLES = {"impression", "impressions", "conclusion", "conclusions"}
_GENDER_TO_CDA = {"M": "M", "F": "F", "O": "UN"}
_GENDER_FROM_CDA = {"M": "M", "F": "F", "UN": "O"}
_LANGUAGE_RE = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$")
_DOCTYPE_RE = re.compile(rb"<!(DOCTYPE|ENTITY)|<\x00!\x00(D|E)\x00|\x00<\x00!\x00(D|E)", re.I)


# --------------------------------------------------------------------------- render


def _el(parent: etree._Element, tag: str, text: str | None = None, **attrs: str) -> etree._Element:
    element = etree.SubElement(parent, _V + tag, {k: v for k, v in attrs.items() if v})
    if text:
        element.text = text
    return element


def _ii(parent: etree._Element, tag: str, identifier: Identifier) -> etree._Element:
    if not identifier:
        return _el(parent, tag, nullFlavor="NI")
    return _el(parent, tag, root=identifier.root, extension=identifier.extension)


def _time(parent: etree._Element, tag: str, value: str) -> None:
    if value:
        _el(parent, tag, value=value)
    else:
        _el(parent, tag, nullFlavor="UNK")


def _name(parent: etree._Element, name: PersonName) -> None:
    element = _el(parent, "name")
    if name.prefix:
        _el(element, "prefix", name.prefix)
    if name.given or name.middle:
        _el(element, "given", name.given)
    if name.middle:
        _el(element, "given", name.middle)
    if name.family:
        _el(element, "family", name.family)
    if name.suffix:
        _el(element, "suffix", name.suffix)


def _person(parent: etree._Element, tag: str, report: Report, organization: bool = True) -> None:
    entity = _el(parent, tag)
    author = report.author
    if author and author.id:
        _el(entity, "id", root=identity.arc(report, identity.STAFF), extension=author.id)
    else:
        _el(entity, "id", nullFlavor="UNK")
    if author and author.name:
        _name(_el(entity, "assignedPerson"), author.name)
    if organization and report.facility:
        _organization(entity, "representedOrganization", report)


def _organization(parent: etree._Element, tag: str, report: Report) -> None:
    element = _el(parent, tag)
    _el(element, "id", root=identity.facility_root(report))
    if report.facility:
        _el(element, "name", report.facility)


def _text(parent: etree._Element, text: str) -> None:
    element = _el(parent, "text")
    lines = text.split("\n")
    element.text = lines[0]
    for line in lines[1:]:
        br = _el(element, "br")
        br.tail = line


def _section(body: etree._Element, kind: Section, text: str) -> None:
    section = _el(_el(body, "component"), "section")
    _el(section, "templateId", root=kind.template)
    _el(
        section,
        "code",
        code=kind.code,
        codeSystem=kind.system,
        codeSystemName=kind.system_name,
        displayName=kind.title,
    )
    _el(section, "title", kind.title)
    _text(section, text)


def render(report: Report) -> bytes:
    """Render a CDA R2 ClinicalDocument (UTF-8 XML)."""
    doc = etree.Element(_V + "ClinicalDocument", nsmap={None: NS, "xsi": XSI})
    _el(doc, "realmCode", code=REALM)
    _el(doc, "typeId", root="2.16.840.1.113883.1.3", extension="POCD_HD000040")
    _el(doc, "templateId", root=DIR_TEMPLATE)
    _ii(doc, "id", identity.document_id(report))
    _el(
        doc,
        "code",
        code="18748-4",
        codeSystem=LOINC.oid,
        codeSystemName="LOINC",
        displayName="Diagnostic Imaging Report",
    )
    _el(doc, "title", "Diagnostic Imaging Report")
    _time(doc, "effectiveTime", format_ts(report.report_time))
    _el(doc, "confidentialityCode", code="N", codeSystem="2.16.840.1.113883.5.25")
    _el(doc, "languageCode", code=report.language or DEFAULT_LANGUAGE)
    _ii(doc, "setId", identity.set_id(report))
    _el(doc, "versionNumber", value=str(report.version))

    patient = report.patient
    role = _el(_el(doc, "recordTarget"), "patientRole")
    if patient.id:
        if is_oid(patient.issuer):
            _el(role, "id", root=patient.issuer, extension=patient.id)
        else:
            root = identity.arc(report, identity.PATIENTS)
            _el(role, "id", root=root, extension=patient.id, assigningAuthorityName=patient.issuer)
    else:
        _el(role, "id", nullFlavor="UNK")
    person = _el(role, "patient")
    _name(person, patient.name)
    if patient.sex in _GENDER_TO_CDA:
        _el(
            person,
            "administrativeGenderCode",
            code=_GENDER_TO_CDA[patient.sex],
            codeSystem="2.16.840.1.113883.5.1",
        )
    elif patient.sex == "U":
        _el(person, "administrativeGenderCode", nullFlavor="UNK")
    if patient.birth_date:
        _el(person, "birthTime", value=format_date(patient.birth_date))

    author = _el(doc, "author")
    _time(author, "time", format_ts(report.report_time))
    _person(author, "assignedAuthor", report)

    custodian = _el(_el(doc, "custodian"), "assignedCustodian")
    _organization(custodian, "representedCustodianOrganization", report)

    if report.status in ("final", "amended"):
        signer = _el(doc, "legalAuthenticator")
        _time(signer, "time", format_ts(report.report_time))
        _el(signer, "signatureCode", code="S")
        _person(signer, "assignedEntity", report, organization=False)

    if report.accession_number:
        order = _el(_el(doc, "inFulfillmentOf"), "order")
        root = identity.arc(report, identity.ORDERS)
        _el(order, "id", root=root, extension=report.accession_number)

    event = _el(_el(doc, "documentationOf"), "serviceEvent", classCode="ACT")
    if report.study_instance_uid:
        _el(event, "id", root=report.study_instance_uid)
    if report.procedure:
        code = report.procedure
        attrs = {"displayName": code.display}
        if code.code:
            system = system_to_oid(code.system)
            name = code.system if system == EMIX_LOCAL_OID else ""
            _el(event, "code", code=code.code, codeSystem=system, codeSystemName=name, **attrs)
        else:
            element = _el(event, "code", nullFlavor="OTH")
            _el(element, "originalText", code.display)
    if report.observation_time:
        _el(event, "effectiveTime", value=format_ts(report.observation_time))

    if report.status == "amended" or report.replaces:
        parent = _el(_el(doc, "relatedDocument", typeCode="RPLC"), "parentDocument")
        _ii(parent, "id", report.replaces)
        _ii(parent, "setId", identity.set_id(report))
        if report.version > 1:
            _el(parent, "versionNumber", value=str(report.version - 1))

    if report.visit_number:
        encounter = _el(_el(doc, "componentOf"), "encompassingEncounter")
        root = identity.arc(report, identity.VISITS)
        _el(encounter, "id", root=root, extension=report.visit_number)
        if report.patient_class != "U":
            _el(
                encounter,
                "code",
                code=report.patient_class,
                codeSystem=PATIENT_CLASS_OID,
                codeSystemName="HL7 Table 0004",
            )
        _time(encounter, "effectiveTime", format_ts(report.observation_time))

    body = _el(_el(doc, "component"), "structuredBody")
    if report.findings:
        _section(body, FINDINGS, report.findings)
    if report.impression:
        _section(body, IMPRESSION, report.impression)
    if report.attachments:
        _attachments(body, report.attachments)
    if not len(body):
        _section(body, FINDINGS, "")
    return etree.tostring(doc, xml_declaration=True, encoding="UTF-8", pretty_print=True)


def _attachments(body: etree._Element, attachments: list[Attachment]) -> None:
    if any(len(a.data) > MAX_ATTACHMENT_BYTES for a in attachments):
        raise ReportFormatError(
            f"an attachment is larger than {MAX_ATTACHMENT_BYTES // 10**6} MB, more than a CDA "
            "document can carry for emix (libxml2's 10 MB text limit): choose HL7, FHIR or PDF"
        )
    section = _el(_el(body, "component"), "section")
    _el(section, "title", "Attachments")
    text = _el(section, "text")
    for number, attachment in enumerate(attachments, start=1):
        media_id = f"attachment-{number}"
        reference = _el(text, "renderMultiMedia", referencedObject=media_id)
        if attachment.title:
            _el(reference, "caption", attachment.title)
        media = _el(_el(section, "entry"), "observationMedia", classCode="OBS", moodCode="EVN")
        media.set("ID", media_id)
        value = _el(media, "value", mediaType=attachment.media_type, representation="B64")
        value.text = base64.b64encode(attachment.data).decode("ascii")


# --------------------------------------------------------------------------- parse


def _parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
    )


def _load(data: bytes) -> etree._Element:
    if _DOCTYPE_RE.search(data):
        raise ReportFormatError(
            "the CDA document has a DOCTYPE (a DTD or entity declaration); emix refuses them "
            "to prevent entity expansion and external fetches: remove the DOCTYPE"
        )
    try:
        tree = etree.ElementTree(etree.fromstring(data, _parser()))
    except etree.XMLSyntaxError as exc:
        if "too long" in (exc.msg or "") or "limit" in (exc.msg or "").lower():
            raise ReportFormatError(
                "the CDA document has a text node over libxml2's 10 MB limit (an attachment "
                f"over about {MAX_ATTACHMENT_BYTES // 10**6} MB); emix refuses it"
            ) from None
        line = f" (line {exc.lineno})" if exc.lineno else ""
        raise ReportFormatError(f"the CDA document is not well-formed XML{line}") from None
    if tree.docinfo.doctype or tree.docinfo.internalDTD is not None:
        raise ReportFormatError("the CDA document has a DOCTYPE; emix refuses them")
    root = tree.getroot()
    if root.tag != _V + "ClinicalDocument":
        raise ReportFormatError(
            "not a CDA document: the root must be urn:hl7-org:v3 ClinicalDocument"
        )
    for node in root.iter():
        if isinstance(node, etree._Entity):
            raise ReportFormatError("the CDA document uses entity references; emix refuses them")
    return root


def _find(element: etree._Element | None, path: str) -> etree._Element | None:
    if element is None:
        return None
    return element.find(path.replace("v:", _V))


def _text_of(element: etree._Element | None) -> str:
    return "".join(element.itertext()).strip() if element is not None else ""


def _attr(element: etree._Element | None, name: str) -> str:
    return (element.get(name) or "").strip() if element is not None else ""


def _parse_name(element: etree._Element | None) -> PersonName:
    if element is None:
        return PersonName()
    givens = [_text_of(g) for g in element.findall(_V + "given")]
    if not givens and not len(element):
        return PersonName(family=_text_of(element))  # an unstructured name
    return PersonName(
        family=" ".join(_text_of(f) for f in element.findall(_V + "family")),
        given=givens[0] if givens else "",
        middle=" ".join(givens[1:]),
        prefix=" ".join(_text_of(p) for p in element.findall(_V + "prefix")),
        suffix=" ".join(_text_of(s) for s in element.findall(_V + "suffix")),
    )


def _narrative(element: etree._Element) -> str:
    """Plain text of a section's narrative block: ``br``, paragraphs and rows break lines."""
    parts: list[str] = []

    def keep(text: str | None) -> None:
        # whitespace with a line end between elements is indentation, not content
        if text and not (text.isspace() and "\n" in text):
            parts.append(text)

    def walk(node: etree._Element) -> None:
        keep(node.text)
        for child in node:
            if not isinstance(child.tag, str):
                keep(child.tail)
                continue
            name = etree.QName(child).localname
            if name == "br":
                parts.append("\n")
            elif name == "renderMultiMedia":
                pass
            else:
                walk(child)
                if name in ("paragraph", "item", "tr", "caption", "list", "table"):
                    parts.append("\n")
                elif name in ("td", "th"):
                    parts.append("\t")
            keep(child.tail)

    walk(element)
    return "".join(parts)


def parse(data: bytes) -> Report:
    """Read a CDA R2 document (structured body, or a plain-text / Base64 non-XML body).

    :raises ReportFormatError: a DOCTYPE, not well-formed, not a ClinicalDocument.
    """
    doc = _load(data)
    custodian = _find(doc, "v:custodian/v:assignedCustodian/v:representedCustodianOrganization")
    facility_oid = _attr(_find(custodian, "v:id"), "root")
    facility_oid = facility_oid if is_oid(facility_oid) and len(facility_oid) <= 64 else ""
    own_roots = {EMIX_LOCAL_OID, ""}
    if facility_oid:
        own_roots.add(f"{facility_oid}.{identity.PATIENTS}")
    role = _find(doc, "v:recordTarget/v:patientRole")
    patient_id = _find(role, "v:id")
    person = _find(role, "v:patient")
    root = _attr(patient_id, "root")
    authority = _attr(patient_id, "assigningAuthorityName")
    gender = _find(person, "v:administrativeGenderCode")
    sex = _GENDER_FROM_CDA.get(_attr(gender, "code").upper(), "")
    if gender is not None and not sex and _attr(gender, "nullFlavor"):
        sex = "U"
    patient = Patient(
        name=_parse_name(_find(person, "v:name")),
        id=_attr(patient_id, "extension"),
        issuer=authority or ("" if root in own_roots else root),
        birth_date=parse_date(_attr(_find(person, "v:birthTime"), "value")),
        sex=sex,
    )

    assigned = _find(doc, "v:author/v:assignedAuthor")
    author = Author(
        name=_parse_name(_find(assigned, "v:assignedPerson/v:name")),
        id=_attr(_find(assigned, "v:id"), "extension"),
    )
    facility = _text_of(
        _find(doc, "v:custodian/v:assignedCustodian/v:representedCustodianOrganization/v:name")
    ) or _text_of(_find(assigned, "v:representedOrganization/v:name"))

    event = _find(doc, "v:documentationOf/v:serviceEvent")
    study_uid = _attr(_find(event, "v:id"), "root")
    if study_uid and not is_valid_uid(study_uid):
        raise ReportFormatError("the CDA report's study instance UID is not a valid DICOM UID")
    code = _find(event, "v:code")
    procedure = Code(
        code=_attr(code, "code"),
        display=_attr(code, "displayName") or _text_of(_find(code, "v:originalText")),
        system=system_from_oid(_attr(code, "codeSystem"), _attr(code, "codeSystemName"))
        if _attr(code, "code")
        else "",
    )
    observed = _find(event, "v:effectiveTime")
    observed_value = _attr(observed, "value") or _attr(_find(observed, "v:low"), "value")

    replaced = _find(doc, "v:relatedDocument[@typeCode='RPLC']/v:parentDocument")
    if _find(doc, "v:relatedDocument[@typeCode='RPLC']") is not None:
        status = "amended"
    elif _find(doc, "v:legalAuthenticator") is not None:
        status = "final"
    else:
        status = "preliminary"

    findings, impression, attachments = _body(doc)
    return Report(
        patient=patient,
        accession_number=_attr(_find(doc, "v:inFulfillmentOf/v:order/v:id"), "extension"),
        study_instance_uid=study_uid,
        procedure=procedure,
        author=author,
        status=status,
        findings=findings,
        impression=impression,
        observation_time=parse_ts(observed_value),
        report_time=parse_ts(_attr(_find(doc, "v:effectiveTime"), "value")),
        attachments=attachments,
        facility=facility,
        **_identifiers(doc, replaced, facility_oid),
        **_encounter(doc),
    )


def _identifier(element: etree._Element | None) -> Identifier:
    """An II, or an empty identifier for a null or malformed one (never an error)."""
    root, extension = _attr(element, "root"), _attr(element, "extension")
    if not root or _attr(element, "nullFlavor"):
        return Identifier()
    try:
        return Identifier(root, extension)
    except ReportFormatError:
        return Identifier()


def _identifiers(
    doc: etree._Element, replaced: etree._Element | None, facility_oid: str
) -> dict[str, Any]:
    version = _attr(_find(doc, "v:versionNumber"), "value")
    language = _attr(_find(doc, "v:languageCode"), "code")
    return {
        "document_id": _identifier(_find(doc, "v:id")),
        "set_id": _identifier(_find(doc, "v:setId")),
        "version": int(version) if version.isdigit() and 1 <= int(version) <= 999_999 else 1,
        "replaces": _identifier(_find(replaced, "v:id")),
        "facility_oid": facility_oid,
        "language": language if _LANGUAGE_RE.match(language) else "",
    }


def _encounter(doc: etree._Element) -> dict[str, Any]:
    encounter = _find(doc, "v:componentOf/v:encompassingEncounter")
    if encounter is None:
        return {}
    code = _attr(_find(encounter, "v:code"), "code").upper()
    return {
        "visit_number": _attr(_find(encounter, "v:id"), "extension"),
        "patient_class": code if code in PATIENT_CLASSES else "",
    }


def _body(doc: etree._Element) -> tuple[str, str, list[Attachment]]:
    findings: list[str] = []
    impression: list[str] = []
    attachments: list[Attachment] = []
    non_xml = _find(doc, "v:component/v:nonXMLBody/v:text")
    if non_xml is not None:
        media_type = _attr(non_xml, "mediaType") or "text/plain"
        if media_type == "text/plain" and _attr(non_xml, "representation") != "B64":
            return _text_of(non_xml), "", []
        return "", "", [_media(non_xml, "")]
    captions: dict[str, str] = {}
    for section in doc.iter(_V + "section"):
        for reference in section.iter(_V + "renderMultiMedia"):
            captions[_attr(reference, "referencedObject")] = _text_of(_find(reference, "v:caption"))
        for media in section.iter(_V + "observationMedia"):
            value = _find(media, "v:value")
            if value is not None:
                attachments.append(_media(value, captions.get(_attr(media, "ID"), "")))
        text = _find(section, "v:text")
        if text is None:
            continue
        narrative = _narrative(text).strip("\n")
        code = _attr(_find(section, "v:code"), "code")
        title = _text_of(_find(section, "v:title"))
        if code in _FINDINGS_CODES or title.lower() == "findings":
            findings.append(narrative)
        elif code in _IMPRESSION_CODES or title.lower() in (
            "impression",
            "impressions",
            "conclusion",
        ):
            impression.append(narrative)
        elif narrative.strip():
            findings.append(f"{title.upper()}:\n{narrative}" if title else narrative)
    return "\n\n".join(findings), "\n\n".join(impression), attachments


def _media(value: etree._Element, title: str) -> Attachment:
    media_type = _attr(value, "mediaType") or "application/octet-stream"
    if _attr(value, "representation") == "B64":
        try:
            data = base64.b64decode("".join((value.text or "").split()), validate=True)
        except (binascii.Error, ValueError):
            raise ReportFormatError("a CDA attachment holds invalid Base64") from None
    else:
        data = (value.text or "").encode("utf-8")
    return Attachment(media_type=media_type, data=data, title=title)
