"""DICOM PS3.15 A.5 audit messages as an IHE ATNA audit record repository expects them.

No schema file ships with emix: the messages are checked structurally with lxml against
the rules of PS3.15 A.5.1 (element order, coded values) and the per-event rules of A.5.3.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from lxml import etree

from emix_core.audit.chain import AuditLog
from emix_core.audit.export import (
    ACTION_CODES,
    EVENT_TYPES,
    to_dicom_audit_message,
    to_dicom_audit_messages,
    to_fhir_audit_event,
)
from emix_core.errors import InvalidInput
from emix_core.model import AuditEvent

STUDY_A = "1.2.826.0.1.3680043.8.498.1001"
STUDY_B = "1.2.826.0.1.3680043.8.498.1002"
STUDY_C = "1.2.826.0.1.3680043.8.498.1003"
_ORDER = [
    "EventIdentification",
    "ActiveParticipant",
    "AuditSourceIdentification",
    "ParticipantObjectIdentification",
]


@pytest.fixture
def log(tmp_path: Path) -> AuditLog:
    return AuditLog(tmp_path / "audit.db", os.urandom(32))


def rows(log: AuditLog, *events: AuditEvent) -> list[dict]:
    for event in events:
        log.append(event)
    return log.events(include_phi=True, limit=None)


def check_structure(text: str) -> etree._Element:
    """PS3.15 A.5.1: element order, required attributes, coded values carry all three parts."""
    root = etree.fromstring(text.encode("utf-8"))
    assert root.tag == "AuditMessage"
    tags = [c.tag for c in root]
    ranks = [_ORDER.index(t) for t in tags]
    assert ranks == sorted(ranks), tags
    assert tags.count("EventIdentification") == 1
    assert tags.count("AuditSourceIdentification") == 1
    assert tags.count("ActiveParticipant") >= 1
    ident = root.find("EventIdentification")
    assert ident.get("EventActionCode") in {"C", "R", "U", "D", "E"}
    assert ident.get("EventOutcomeIndicator") in {"0", "4", "8", "12"}
    assert ident.get("EventDateTime")
    for coded in root.iter(
        "EventID",
        "EventTypeCode",
        "RoleIDCode",
        "AuditSourceTypeCode",
        "ParticipantObjectIDTypeCode",
    ):
        assert coded.get("csd-code") and coded.get("codeSystemName") and coded.get("originalText")
    for participant in root.findall("ActiveParticipant"):
        assert participant.get("UserID")
        assert participant.get("UserIsRequestor") in {"true", "false"}
    return root


def roles(root: etree._Element) -> dict[str, etree._Element]:
    return {
        p.find("RoleIDCode").get("csd-code"): p
        for p in root.findall("ActiveParticipant")
        if p.find("RoleIDCode") is not None
    }


def objects(root: etree._Element, type_code: str, role: str) -> list[str]:
    return [
        o.get("ParticipantObjectID")
        for o in root.findall("ParticipantObjectIdentification")
        if o.get("ParticipantObjectTypeCode") == type_code
        and o.get("ParticipantObjectTypeCodeRole") == role
    ]


def test_a_sent_package_names_this_node_as_source_and_the_hub_as_destination(log) -> None:
    (row,) = rows(
        log,
        AuditEvent(
            event_type="instances-transferred",
            action="R",
            actor="dr.lee@mercy.example",
            source="10.1.2.3",
            package_id="pkg1",
            phi={"studies": [STUDY_A], "patients": ["PAT-1"]},
        ),
    )
    root = check_structure(to_dicom_audit_message(row, audit_source_id="mercy-gw1"))
    found = roles(root)
    assert found["110153"].get("UserID") == "mercy-gw1"
    assert found["110152"].get("NetworkAccessPointID") == "10.1.2.3"
    assert found["110152"].get("NetworkAccessPointTypeCode") == "2"
    requestors = [
        p for p in root.findall("ActiveParticipant") if p.get("UserIsRequestor") == "true"
    ]
    assert [p.get("UserID") for p in requestors] == ["dr.lee@mercy.example"]
    assert objects(root, "1", "1") == ["PAT-1"]
    assert objects(root, "2", "3") == [STUDY_A]
    assert root.find("AuditSourceIdentification").get("AuditSourceID") == "mercy-gw1"


def test_a_received_package_names_the_peer_as_source(log) -> None:
    (row,) = rows(
        log,
        AuditEvent(
            event_type="instances-transferred",
            action="C",
            source="hub.example",
            phi={"studies": [STUDY_A]},
        ),
    )
    found = roles(check_structure(to_dicom_audit_message(row, audit_source_id="lakeside")))
    assert found["110153"].get("UserID") == "hub.example"
    assert found["110153"].get("NetworkAccessPointTypeCode") == "1"
    assert found["110152"].get("UserID") == "lakeside"


def test_an_event_about_several_patients_becomes_one_message_per_patient(log) -> None:
    (row,) = rows(
        log,
        AuditEvent(
            event_type="instances-transferred",
            action="R",
            phi={
                "studies": [
                    {"study_uid": STUDY_A, "patient_id": "PAT-1"},
                    {"study_uid": STUDY_B, "patient_id": "PAT-2"},
                    {"study_uid": STUDY_C, "patient_id": "PAT-1"},
                ],
                "patients": [{"patient_id": "PAT-1", "patient_name": "Doe^Jane"}, "PAT-2"],
            },
        ),
    )
    messages = [check_structure(m) for m in to_dicom_audit_messages(row)]
    assert [objects(m, "1", "1") for m in messages] == [["PAT-1"], ["PAT-2"]]
    assert [objects(m, "2", "3") for m in messages] == [[STUDY_A, STUDY_C], [STUDY_B]]
    assert messages[0].find(".//ParticipantObjectName").text == "Doe^Jane"
    with pytest.raises(InvalidInput, match="one message per patient"):
        to_dicom_audit_message(row)


def test_studies_of_unknown_patients_never_land_in_another_patients_message(log) -> None:
    (row,) = rows(
        log,
        AuditEvent(
            event_type="instances-transferred",
            action="R",
            phi={"studies": [STUDY_A, STUDY_B], "patients": ["PAT-1", "PAT-2"]},
        ),
    )
    messages = [check_structure(m) for m in to_dicom_audit_messages(row)]
    assert [objects(m, "1", "1") for m in messages] == [["PAT-1"], ["PAT-2"], []]
    assert [objects(m, "2", "3") for m in messages] == [[], [], [STUDY_A, STUDY_B]]


@pytest.mark.parametrize(
    ("event_type", "recorded", "expected"),
    [
        ("begin-transferring", "R", "E"),
        ("security-alert", "C", "E"),
        ("security-alert", "U", "E"),
        ("instances-transferred", "E", "R"),
        ("instances-transferred", "C", "C"),
        ("export", "R", "R"),
        ("import", "E", "C"),
        ("study-deleted", "E", "D"),
        ("instances-accessed", "U", "U"),
        ("query", "R", "E"),
    ],
)
def test_every_event_gets_the_action_code_ps3_15_allows(
    log, event_type: str, recorded: str, expected: str
) -> None:
    (row,) = rows(log, AuditEvent(event_type=event_type, action=recorded))
    root = check_structure(to_dicom_audit_message(row))
    assert root.find("EventIdentification").get("EventActionCode") == expected
    assert expected in ACTION_CODES[event_type]
    assert to_fhir_audit_event(row)["action"] == expected


def test_login_and_security_alerts_carry_their_event_type_codes(log) -> None:
    login, throttled, key = rows(
        log,
        AuditEvent(
            event_type="user-authentication",
            action="E",
            outcome=4,
            actor="unknown",
            source="192.0.2.7",
            detail="failed sign-in",
        ),
        AuditEvent(
            event_type="security-alert",
            action="E",
            outcome=8,
            actor="unknown",
            source="192.0.2.7",
            detail="repeated failed sign-ins: throttled",
        ),
        AuditEvent(
            event_type="security-alert",
            action="U",
            actor="hub-operator",
            detail="signing key of facility lakeside.example reset",
        ),
    )
    root = check_structure(to_dicom_audit_message(login, audit_source_id="hub1"))
    assert root.find("EventIdentification/EventID").get("csd-code") == "110114"
    assert root.find("EventIdentification/EventTypeCode").get("csd-code") == "110122"
    users = {p.get("UserID"): p for p in root.findall("ActiveParticipant")}
    assert users["unknown"].get("UserIsRequestor") == "true"
    assert users["unknown"].get("NetworkAccessPointID") == "192.0.2.7"
    assert users["hub1"].get("UserIsRequestor") == "false"
    alert = check_structure(to_dicom_audit_message(throttled))
    assert alert.find("EventIdentification/EventID").get("csd-code") == "110113"
    assert alert.find("EventIdentification/EventTypeCode").get("csd-code") == "110126"
    reset = check_structure(to_dicom_audit_message(key))
    assert reset.find("EventIdentification/EventTypeCode").get("originalText") == (
        "Security Configuration"
    )
    assert to_fhir_audit_event(login)["subtype"][0]["code"] == "110122"


def test_a_query_carries_its_keys_base64_encoded(log) -> None:
    (row,) = rows(
        log,
        AuditEvent(
            event_type="query",
            action="E",
            source="pacs.example",
            phi={"query": {"PatientID": "PAT-1"}, "studies": [STUDY_A]},
        ),
    )
    root = check_structure(to_dicom_audit_message(row))
    query = root.find("ParticipantObjectIdentification/ParticipantObjectQuery")
    assert json.loads(base64.b64decode(query.text)) == {"PatientID": "PAT-1"}


def test_every_event_type_makes_a_well_formed_message(log) -> None:
    for row in rows(log, *(AuditEvent(event_type=name) for name in EVENT_TYPES)):
        root = check_structure(to_dicom_audit_message(row, audit_source_id="node-7"))
        assert root.find("AuditSourceIdentification").get("AuditSourceID") == "node-7"
        if row["event_type"] in {"begin-transferring", "instances-transferred", "export", "import"}:
            assert set(roles(root)) == {"110153", "110152"}


def test_the_export_command_writes_one_line_per_patient_under_the_nodes_source_id(
    tmp_path: Path,
) -> None:
    from click.testing import CliRunner

    from emix_core.cli.main import build_cli
    from emix_core.client.home import LocalHome
    from emix_core.plugins import get_plugin_manager

    home = LocalHome(tmp_path / "home", get_plugin_manager(load_entry_points=False))
    home.audit(
        AuditEvent(
            event_type="instances-transferred",
            action="R",
            actor="dr.lee@mercy.example",
            package_id="pkg1",
            phi={
                "studies": [
                    {"study_uid": STUDY_A, "patient_id": "PAT-1"},
                    {"study_uid": STUDY_B, "patient_id": "PAT-2"},
                ]
            },
            detail="sent 2 items",
        )
    )
    result = CliRunner().invoke(
        build_cli(),
        [
            "audit",
            "export",
            "--home",
            str(home.path),
            "--format",
            "dicom",
            "--audit-source-id",
            "mercy-gw1",
        ],
    )
    assert result.exit_code == 0, result.output
    messages = [check_structure(line) for line in result.output.splitlines()]
    assert [objects(m, "1", "1") for m in messages] == [["PAT-1"], ["PAT-2"]]
    assert {roles(m)["110153"].get("UserID") for m in messages} == {"mercy-gw1"}
