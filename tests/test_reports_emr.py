"""Reports an EMR links cleanly: identifiers, versions, amendments, CDA header and
templates, HL7 ORU with ORC/PV1 and a stable control id, FHIR transaction Bundles."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from lxml import etree

from emix_core.config import load_config
from emix_core.content.samples import generate_study
from emix_core.content.uids import new_uid
from emix_core.errors import ConfigError
from emix_core.plugins import get_plugin_manager
from emix_core.reports import identity
from emix_core.reports.codes import EMIX_LOCAL_OID
from emix_core.reports.convert import (
    context_from_studies,
    deliver_in_preferred_format,
    parse_report,
    render_report,
)
from emix_core.reports.model import Attachment, Identifier, Patient, PersonName, Report
from tests.test_reports import full_report

NS = {"v": "urn:hl7-org:v3"}
MERCY_OID = "2.999.4711.1"  # the ISO example arc
PYDICOM_PREFIX = "1.2.826.0.1.3680043.8.498."
#: POCD_MT000040.ClinicalDocument, in the order the CDA R2 schema's sequence fixes.
CDA_HEADER_ORDER = [
    "realmCode", "typeId", "templateId", "id", "code", "title", "effectiveTime",
    "confidentialityCode", "languageCode", "setId", "versionNumber", "copyTime",
    "recordTarget", "author", "dataEnterer", "informant", "custodian",
    "informationRecipient", "legalAuthenticator", "authenticator", "participant",
    "inFulfillmentOf", "documentationOf", "relatedDocument", "authorization",
    "componentOf", "component",
]  # fmt: skip
#: POCD_MT000040.Section, in schema order.
SECTION_ORDER = [
    "templateId", "id", "code", "title", "text", "confidentialityCode", "languageCode",
    "subject", "author", "informant", "entry", "component",
]  # fmt: skip
#: Required children (CDA R2 cardinality 1..) of the elements emix writes.
CDA_REQUIRED = {
    "ClinicalDocument": ["typeId", "id", "code", "effectiveTime", "confidentialityCode",
                         "recordTarget", "author", "custodian", "component"],
    "patientRole": ["id"],
    "author": ["time", "assignedAuthor"],
    "assignedAuthor": ["id"],
    "representedCustodianOrganization": ["id"],
    "legalAuthenticator": ["time", "signatureCode", "assignedEntity"],
    "assignedEntity": ["id"],
    "order": ["id"],
    "parentDocument": ["id"],
    "encompassingEncounter": ["id", "effectiveTime"],
}  # fmt: skip


@pytest.fixture(scope="module")
def pm():
    return get_plugin_manager(load_entry_points=False)


def mercy_report(**changes) -> Report:
    report = full_report(facility_oid=MERCY_OID, visit_number="V-20250115-7", patient_class="I")
    return replace(report, **changes)


def cda_tree(data: bytes) -> etree._Element:
    return etree.fromstring(data, etree.XMLParser(resolve_entities=False, no_network=True))


def local(element: etree._Element) -> str:
    return etree.QName(element).localname


def check_cda_structure(root: etree._Element) -> None:
    """What the CDA R2 schema checks of emix's header, without the schema itself."""
    names = [local(child) for child in root]
    positions = [CDA_HEADER_ORDER.index(name) for name in names]
    assert positions == sorted(positions), names
    for element in root.iter():
        if not isinstance(element.tag, str):
            continue
        required = CDA_REQUIRED.get(local(element), [])
        children = {local(c) for c in element}
        assert set(required) <= children, (local(element), required, children)
        if local(element) in ("id", "setId") and element.get("nullFlavor") is None:
            assert element.get("root"), "an II without nullFlavor has a root"
    for section in root.iter("{urn:hl7-org:v3}section"):
        order = [local(c) for c in section]
        positions = [SECTION_ORDER.index(n) for n in order]
        assert positions == sorted(positions), order


# --------------------------------------------------------------------------- identifiers


def test_identifiers_are_issued_under_the_facility_oid(pm):
    report = mercy_report(patient=Patient(PersonName("Roe", "Ann"), "MRN-1", "MERCY"))
    root = cda_tree(render_report(pm, report, "cda"))
    ids = {
        "document": root.find("v:id", NS),
        "set": root.find("v:setId", NS),
        "patient": root.find("v:recordTarget/v:patientRole/v:id", NS),
        "author": root.find("v:author/v:assignedAuthor/v:id", NS),
        "custodian": root.find(
            "v:custodian/v:assignedCustodian/v:representedCustodianOrganization/v:id", NS
        ),
        "order": root.find("v:inFulfillmentOf/v:order/v:id", NS),
        "visit": root.find("v:componentOf/v:encompassingEncounter/v:id", NS),
    }
    assert {name: e.get("root") for name, e in ids.items()} == {
        "document": f"{MERCY_OID}.1",
        "set": f"{MERCY_OID}.1",
        "patient": f"{MERCY_OID}.4",
        "author": f"{MERCY_OID}.3",
        "custodian": MERCY_OID,
        "order": f"{MERCY_OID}.2",
        "visit": f"{MERCY_OID}.5",
    }
    assert ids["order"].get("extension") == report.accession_number
    assert ids["patient"].get("assigningAuthorityName") == "MERCY"
    assert EMIX_LOCAL_OID.encode() not in render_report(pm, report, "cda")


def test_facilities_without_an_oid_never_share_one(pm):
    roots = {
        cda_tree(render_report(pm, full_report(facility=name), "cda")).find("v:id", NS).get("root")
        for name in ("Mercy General", "Lakeside Clinic", "St. Mary's")
    }
    assert len(roots) == 3 and all(r.startswith("2.25.") for r in roots)
    assert EMIX_LOCAL_OID not in {r.rsplit(".", 1)[0] for r in roots}


def test_the_same_report_gets_the_same_ids_and_a_changed_one_new_ids(pm):
    report = mercy_report()
    first, second = render_report(pm, report, "hl7"), render_report(pm, report, "hl7")
    control = identity.message_control_id(report)
    assert first.split(b"\r")[0].split(b"|")[9].decode() == control
    assert second.split(b"\r")[0].split(b"|")[9].decode() == control
    assert len(control) == 20
    cda_ids = {cda_tree(render_report(pm, report, "cda")).find("v:id", NS).get("extension")}
    cda_ids.add(cda_tree(render_report(pm, report, "cda")).find("v:id", NS).get("extension"))
    assert len(cda_ids) == 1
    corrected = replace(report, impression="Small subdural haematoma.", status="amended")
    assert identity.message_control_id(corrected) != control
    assert identity.message_control_id(replace(report, version=2)) != control
    # the versions of one order's report share their set id
    assert identity.set_id(corrected) == identity.set_id(report)


def test_a_report_from_another_system_keeps_its_own_ids(pm):
    report = mercy_report(
        document_id=Identifier("1.2.840.113619.2.1.9", "RPT-2025-0042"),
        set_id=Identifier("1.2.840.113619.2.1.9", "SET-0042"),
        version=3,
    )
    root = cda_tree(render_report(pm, report, "cda"))
    assert root.find("v:id", NS).attrib == {
        "root": "1.2.840.113619.2.1.9",
        "extension": "RPT-2025-0042",
    }
    assert root.find("v:setId", NS).get("extension") == "SET-0042"
    assert root.find("v:versionNumber", NS).get("value") == "3"
    for fmt in ("cda", "fhir"):
        back = parse_report(pm, render_report(pm, report, fmt))
        assert (back.document_id, back.set_id) == (report.document_id, report.set_id), fmt


def test_malformed_identifiers_are_refused():
    from emix_core.errors import ReportFormatError

    with pytest.raises(ReportFormatError, match="OID or a UUID"):
        Identifier("not an oid", "1")
    with pytest.raises(ReportFormatError, match="needs the OID"):
        Identifier("", "RPT-1")
    with pytest.raises(ReportFormatError, match="facility OID"):
        Report(facility_oid="1.2.abc")
    with pytest.raises(ReportFormatError, match="patient class"):
        Report(patient_class="X")


# --------------------------------------------------------------------------- CDA


def test_cda_header_is_in_schema_order_with_realm_language_set_and_version(pm):
    data = render_report(pm, mercy_report(language="de-DE"), "cda")
    root = cda_tree(data)
    check_cda_structure(root)
    assert root.find("v:realmCode", NS).get("code") == "UV"
    assert root.find("v:languageCode", NS).get("code") == "de-DE"
    assert root.find("v:versionNumber", NS).get("value") == "1"
    assert root.find("v:setId", NS).get("root") == f"{MERCY_OID}.1"
    encounter = root.find("v:componentOf/v:encompassingEncounter", NS)
    assert encounter.find("v:code", NS).get("code") == "I"
    assert parse_report(pm, data).language == "de-DE"


def test_cda_sections_carry_dir_and_dicom_templates(pm):
    root = cda_tree(render_report(pm, mercy_report(), "cda"))
    sections = {
        s.findtext("v:title", None, NS): (
            s.find("v:templateId", NS).get("root")
            if s.find("v:templateId", NS) is not None
            else None,
            s.find("v:code", NS).get("code") if s.find("v:code", NS) is not None else None,
        )
        for s in root.iter("{urn:hl7-org:v3}section")
    }
    assert sections["Findings"] == ("2.16.840.1.113883.10.20.6.1.2", "121070")
    assert sections["Impressions"] == ("1.2.840.10008.9.5", "19005-8")
    assert root.find("v:templateId", NS).get("root") == "2.16.840.1.113883.10.20.6"


def test_an_amendment_names_the_document_it_replaces(pm):
    original = parse_report(pm, render_report(pm, mercy_report(), "cda"))
    amended = replace(
        original,
        status="amended",
        impression="Addendum: 3 mm subdural haematoma, left frontal.",
        replaces=original.document_id,
        version=original.version + 1,
        document_id=Identifier(),
    )
    root = cda_tree(render_report(pm, amended, "cda"))
    check_cda_structure(root)
    parent = root.find("v:relatedDocument[@typeCode='RPLC']/v:parentDocument", NS)
    assert parent.find("v:id", NS).attrib == {
        "root": original.document_id.root,
        "extension": original.document_id.extension,
    }
    assert parent.find("v:setId", NS).attrib == root.find("v:setId", NS).attrib
    assert parent.find("v:versionNumber", NS).get("value") == "1"
    assert root.find("v:versionNumber", NS).get("value") == "2"
    assert root.find("v:id", NS).get("extension") != original.document_id.extension
    back = parse_report(pm, render_report(pm, amended, "cda"))
    assert (back.status, back.replaces, back.version) == ("amended", original.document_id, 2)
    assert back.set_id == original.set_id


def test_cda_still_refuses_entities_and_doctypes(pm):
    from emix_core.errors import ReportFormatError

    hostile = (
        b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b'<ClinicalDocument xmlns="urn:hl7-org:v3"><id root="1.2" extension="&x;"/>'
        b"</ClinicalDocument>"
    )
    with pytest.raises(ReportFormatError, match="DOCTYPE"):
        parse_report(pm, hostile)


def test_a_hostile_version_or_id_in_a_received_cda_is_ignored_not_trusted(pm):
    data = render_report(pm, mercy_report(), "cda")
    data = data.replace(b'<versionNumber value="1"/>', b'<versionNumber value="99999999999"/>')
    data = data.replace(f'<setId root="{MERCY_OID}.1"'.encode(), b'<setId root="../../etc"')
    report = parse_report(pm, data)
    assert report.version == 1 and not report.set_id


# --------------------------------------------------------------------------- HL7 v2


def strict(data: bytes):
    message = parse_message(
        data.decode("utf-8"), validation_level=VALIDATION_LEVEL.STRICT, find_groups=True
    )
    message.validate()
    return message


def test_hl7_oru_has_pv1_and_orc_and_passes_strict_validation(pm):
    report = mercy_report()
    data = render_report(pm, report, "hl7")
    message = strict(data)
    segments = [s[:3] for s in data.decode().split("\r") if s]
    assert segments[:5] == ["MSH", "PID", "PV1", "ORC", "OBR"]
    result = message.oru_r01_patient_result
    visit = result.oru_r01_patient.oru_r01_visit.pv1
    assert visit.pv1_2.to_er7() == "I"
    assert visit.pv1_19.to_er7().startswith("V-20250115-7^^^&" + MERCY_OID + ".5&ISO")
    order = result.oru_r01_order_observation
    assert order.orc.orc_1.to_er7() == "RE"
    assert order.orc.orc_3.to_er7() == f"ACC-99120^^{MERCY_OID}.2^ISO"
    assert order.obr.obr_3.to_er7() == order.orc.orc_3.to_er7()
    assert message.msh.msh_4.to_er7() == f"Klinikum München^{MERCY_OID}^ISO"
    back = parse_report(pm, data)
    assert back == report
    assert (back.visit_number, back.patient_class, back.facility_oid) == (
        "V-20250115-7",
        "I",
        MERCY_OID,
    )


def test_hl7_without_order_or_visit_has_neither_segment_and_stays_strictly_valid(pm):
    report = Report(findings="Outside film review.", impression="See comments.")
    data = render_report(pm, report, "hl7")
    strict(data)
    assert [s[:3] for s in data.decode().split("\r") if s] == ["MSH", "PID", "OBR", "OBX", "OBX"]


# --------------------------------------------------------------------------- FHIR


def fhir_bundle(pm, report: Report) -> dict:
    from fhir.resources.R4B.bundle import Bundle

    data = render_report(pm, report, "fhir")
    bundle = json.loads(data)
    Bundle.model_validate(bundle)
    return bundle


def by_type(bundle: dict) -> dict[str, dict]:
    return {e["resource"]["resourceType"]: e for e in bundle["entry"]}


def test_fhir_is_one_transaction_with_conditional_creates(pm):
    report = mercy_report()
    bundle = fhir_bundle(pm, report)
    assert bundle["type"] == "transaction"
    entries = by_type(bundle)
    assert set(entries) == {
        "Patient", "Organization", "Practitioner", "Encounter", "ImagingStudy", "Observation",
        "Binary", "DiagnosticReport", "DocumentReference",
    }  # fmt: skip
    full_urls = {e["fullUrl"] for e in bundle["entry"]}
    assert all(url.startswith("urn:uuid:") for url in full_urls)
    patient = entries["Patient"]
    assert patient["request"] == {
        "method": "POST",
        "url": "Patient",
        "ifNoneExist": "identifier=urn:oid:1.2.276.0.7230010.3|PID-7734",
    }
    for kind in ("Organization", "Practitioner", "Encounter", "ImagingStudy", "DiagnosticReport"):
        assert entries[kind]["request"]["ifNoneExist"].startswith("identifier="), kind
    # every reference inside the Bundle points at an entry of the Bundle
    text = json.dumps(bundle)
    for start in range(len(text)):
        if text.startswith('"reference": "', start):
            target = text[start + 14 : text.index('"', start + 14)]
            assert target in full_urls
    diagnostic = entries["DiagnosticReport"]["resource"]
    assert diagnostic["presentedForm"][0]["url"] == entries["Binary"]["fullUrl"]
    binary = entries["Binary"]["resource"]
    assert base64.b64decode(binary["data"]) == report.attachments[0].data
    assert diagnostic["identifier"][0]["system"] == f"urn:oid:{MERCY_OID}.1"


def test_posting_the_same_report_twice_asks_for_the_same_conditions(pm):
    first = by_type(fhir_bundle(pm, mercy_report()))
    second = by_type(fhir_bundle(pm, mercy_report()))
    for kind in ("Patient", "DiagnosticReport", "Observation", "DocumentReference"):
        assert first[kind]["request"] == second[kind]["request"], kind


def test_fhir_amendment_relates_to_the_replaced_document(pm):
    replaced = Identifier(f"{MERCY_OID}.1", "RPT-1")
    bundle = fhir_bundle(pm, mercy_report(status="amended", replaces=replaced, version=2))
    reference = by_type(bundle)["DocumentReference"]["resource"]
    assert reference["relatesTo"] == [
        {
            "code": "replaces",
            "target": {"identifier": {"system": f"urn:oid:{MERCY_OID}.1", "value": "RPT-1"}},
        }
    ]
    assert reference["docStatus"] == "amended"
    back = parse_report(pm, json.dumps(bundle).encode())
    assert back.replaces == replaced and back.status == "amended"


def test_fhir_without_study_or_attachment_has_only_what_exists(pm):
    bundle = fhir_bundle(pm, Report(findings="Outside film review.", impression="See comments."))
    assert set(by_type(bundle)) == {"Patient", "Observation", "DiagnosticReport"}
    assert "ifNoneExist" not in by_type(bundle)["Patient"]["request"]  # nothing to match on


def test_older_collection_bundles_and_bare_reports_still_read(pm):
    report = full_report()
    bundle = json.loads(render_report(pm, report, "fhir"))
    entries = by_type(bundle)
    diagnostic = entries["DiagnosticReport"]["resource"]
    # the layout emix wrote before: a collection, attachments inline, no requests
    diagnostic["presentedForm"] = [
        {"contentType": a.media_type, "data": base64.b64encode(a.data).decode(), "title": a.title}
        for a in report.attachments
    ]
    collection = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": e["fullUrl"], "resource": e["resource"]}
            for e in bundle["entry"]
            if e["resource"]["resourceType"] not in ("Binary", "DocumentReference")
        ],
    }
    assert parse_report(pm, json.dumps(collection).encode()) == report
    links = ("subject", "performer", "result", "resultsInterpreter", "imagingStudy")
    bare = {k: v for k, v in diagnostic.items() if k not in links}
    parsed = parse_report(pm, json.dumps(bare).encode())
    assert parsed.impression == report.impression and parsed.attachments == report.attachments


def test_a_transaction_entry_without_a_request_is_refused(pm):
    from emix_core.errors import ReportFormatError

    bundle = fhir_bundle(pm, full_report())
    del bundle["entry"][0]["request"]
    with pytest.raises(ReportFormatError, match="request.method"):
        parse_report(pm, json.dumps(bundle).encode())


# --------------------------------------------------------------------------- configuration


def test_facility_oid_and_uid_root_are_read_from_the_home(tmp_path, monkeypatch):
    monkeypatch.delenv("EMIX_FACILITY_OID", raising=False)
    monkeypatch.delenv("EMIX_UID_ROOT", raising=False)
    (tmp_path / "emix.toml").write_text(
        f'[identifiers]\nfacility_oid = "{MERCY_OID}"\nuid_root = "1.2.826.0.1.3456789"\n'
    )
    settings = load_config(tmp_path).identifiers
    assert (settings.facility_oid, settings.uid_root) == (MERCY_OID, "1.2.826.0.1.3456789")
    monkeypatch.setenv("EMIX_UID_ROOT", "1.3.6.1.4.1.99999")
    assert load_config(tmp_path).identifiers.uid_root == "1.3.6.1.4.1.99999"


@pytest.mark.parametrize(
    "line",
    [
        'facility_oid = "1.2.04"',
        'facility_oid = "urn:oid:1.2.3"',
        'uid_root = "1.2.826.0.1.3680043.8.498.1.2.3.4.5.6.7.8.9.10.11.12"',
        'uid_root = "1.2.x"',
        "colour = 1",
    ],
)
def test_a_bad_identifier_setting_is_a_config_error(tmp_path, line):
    (tmp_path / "emix.toml").write_text(f"[identifiers]\n{line}\n")
    with pytest.raises(ConfigError, match=r"\[identifiers\]"):
        load_config(tmp_path)


def test_dicom_uids_are_made_under_the_organisation_root(tmp_path, monkeypatch):
    monkeypatch.setenv("EMIX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("EMIX_UID_ROOT", raising=False)
    assert new_uid().startswith("2.25.")
    root = "1.2.826.0.1.3456789"
    uids = {new_uid(root) for _ in range(200)}
    assert len(uids) == 200
    assert all(u.startswith(root + ".") and len(u) <= 64 for u in uids)
    assert all(pydicom.uid.UID(u).is_valid for u in uids)
    assert new_uid(root, entropy=["a", "b"]) == new_uid(root, entropy=["a", "b"])
    monkeypatch.setenv("EMIX_UID_ROOT", root)
    files = generate_study(tmp_path / "study", slices=2, series=1, rows=8, columns=8)
    for path in files:
        ds = pydicom.dcmread(path)
        for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
            assert uid.startswith(root + ".") and not uid.startswith(PYDICOM_PREFIX)


def test_a_received_pdf_becomes_a_report_under_the_recipients_oid(pm, tmp_path):
    documents = tmp_path / "documents"
    documents.mkdir()
    pdf = documents / "0001-report.pdf"
    pdf.write_bytes(render_report(pm, full_report(), "pdf"))
    study = {"study_uid": "1.2.3.4", "patient_id": "P-9", "patient_name": "ROE^ANN",
             "accession_number": "ACC-7"}  # fmt: skip
    context = context_from_studies([study], facility_oid=MERCY_OID)
    copy = deliver_in_preferred_format(pm, pdf, "hl7", context=context)
    assert isinstance(copy, Path)
    # hl7apy's strict level caps an ED value at 199 characters (HL7 allows 65536), so a
    # PDF's message is checked at its tolerant level; small attachments pass strict.
    message = parse_message(copy.read_bytes().decode(), find_groups=True)
    message.validate()
    assert message.msh.msh_4.to_er7() == f"^{MERCY_OID}^ISO"
    report = parse_report(pm, copy.read_bytes())
    assert report.facility_oid == MERCY_OID and report.accession_number == "ACC-7"
    assert report.attachments == [
        Attachment("application/pdf", pdf.read_bytes(), report.attachments[0].title)
    ]


def test_report_convert_issues_ids_under_the_homes_facility_oid(pm, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from emix_core.reports.cli import report as report_group

    source = tmp_path / "report.txt"
    source.write_bytes(render_report(pm, full_report(), "txt"))  # text carries no ids
    monkeypatch.setenv("EMIX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EMIX_FACILITY_OID", MERCY_OID)
    result = CliRunner().invoke(report_group, ["convert", str(source), "--to", "cda"])
    assert result.exit_code == 0, result.output
    root = cda_tree(result.stdout_bytes)
    assert root.find("v:id", NS).get("root") == f"{MERCY_OID}.1"


def test_an_amendment_without_its_predecessor_still_names_the_set(pm):
    report = mercy_report(status="amended", version=3)
    root = cda_tree(render_report(pm, report, "cda"))
    parent = root.find("v:relatedDocument[@typeCode='RPLC']/v:parentDocument", NS)
    assert parent.find("v:id", NS).attrib == {"nullFlavor": "NI"}
    assert parent.find("v:setId", NS).attrib == root.find("v:setId", NS).attrib
    assert parent.find("v:versionNumber", NS).get("value") == "2"
    check_cda_structure(root)


def test_hostile_identifiers_in_received_hl7_and_fhir_are_dropped_not_trusted(pm):
    hl7 = render_report(pm, mercy_report(), "hl7").decode()
    hl7 = hl7.replace("PV1|1|I|", "PV1|1|Z|").replace(f"^^^^^^^^^{MERCY_OID}", "^^^^^^^^^1.2.x")
    hl7 = hl7.replace(f"^{MERCY_OID}^ISO", "^../etc^ISO", 1)
    report = parse_report(pm, hl7.encode())
    assert report.patient_class == "U" and report.facility_oid == ""  # a visit, class unknown
    bundle = json.loads(
        render_report(pm, mercy_report(replaces=Identifier("2.999.1", "X")), "fhir")
    )
    for entry in bundle["entry"]:
        if entry["resource"]["resourceType"] == "DocumentReference":
            entry["resource"]["relatesTo"][0]["target"]["identifier"]["system"] = "javascript:x"
        if entry["resource"]["resourceType"] == "DiagnosticReport":
            entry["resource"]["identifier"][0]["system"] = "urn:oid:not-an-oid"
    report = parse_report(pm, json.dumps(bundle).encode())
    assert not report.replaces and not report.document_id
