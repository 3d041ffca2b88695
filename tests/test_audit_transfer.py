"""The sending side's audit helper: begin, then exactly one outcome per transfer."""

from __future__ import annotations

import pytest

from emix_core import (
    AuditAction,
    AuditEvent,
    AuditOutcome,
    HubUnavailable,
    audited_query,
    audited_transfer,
)


class Recorder:
    """Stands where a local home or a hub keeps its audit chain."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def audit(self, event: AuditEvent) -> None:
        self.events.append(event)

    def rows(self) -> list[tuple[str, AuditOutcome, str]]:
        return [(e.event_type, e.outcome, e.detail) for e in self.events]


STUDY = "1.2.826.0.1.3680043.8.498.1"


def test_a_transfer_records_begin_then_one_outcome_with_the_final_identifiers():
    home = Recorder()
    with audited_transfer(
        home,
        action=AuditAction.READ,
        actor="mercy-general",
        peer="pacs.example.org",
        package_id="p1",
        phi={"studies": [STUDY]},
        what="STOW-RS into PACS",
        begin="storing 3 instances",
    ) as audit:
        audit.done("3 stored", succeeded=3, phi={"studies": [STUDY], "patients": ["MRN1"]})
    assert home.rows() == [
        ("begin-transferring", AuditOutcome.SUCCESS, "storing 3 instances"),
        ("instances-transferred", AuditOutcome.SUCCESS, "3 stored"),
    ]
    assert [e.action for e in home.events] == [AuditAction.EXECUTE, AuditAction.READ]
    end = home.events[-1]
    assert end.source == "pacs.example.org" and end.package_id == "p1"
    assert end.phi == {"studies": [STUDY], "patients": ["MRN1"]}


@pytest.mark.parametrize(
    ("succeeded", "failed", "outcome"),
    [
        (5, 0, AuditOutcome.SUCCESS),
        (4, 1, AuditOutcome.MINOR_FAILURE),
        (0, 5, AuditOutcome.SERIOUS_FAILURE),
    ],
)
def test_the_outcome_follows_from_what_went_and_what_failed(succeeded, failed, outcome):
    home = Recorder()
    with audited_transfer(home, action=AuditAction.CREATE, actor="a", what="retrieval") as audit:
        audit.done("done", succeeded=succeeded, failed=failed)
    assert home.rows() == [("instances-transferred", outcome, "done")]


def test_an_error_is_recorded_as_a_serious_failure_with_its_message_and_raised_again():
    home = Recorder()
    with (
        pytest.raises(HubUnavailable),
        audited_transfer(
            home, action=AuditAction.READ, actor="a", what="sending", begin="sending 2 items"
        ),
    ):
        raise HubUnavailable("the hub did not answer; try again later")
    assert home.rows()[-1] == (
        "instances-transferred",
        AuditOutcome.SERIOUS_FAILURE,
        "sending failed: the hub did not answer; try again later",
    )


def test_an_interruption_is_recorded_without_its_text_which_may_hold_phi():
    home = Recorder()
    with (
        pytest.raises(ValueError),
        audited_transfer(home, action=AuditAction.READ, actor="a", what="sending"),
    ):
        raise ValueError("DOE^JANE.dcm is odd")
    assert home.rows() == [
        ("instances-transferred", AuditOutcome.SERIOUS_FAILURE, "sending stopped: ValueError")
    ]


def test_an_outcome_cannot_be_recorded_twice():
    home = Recorder()
    with (
        pytest.raises(RuntimeError, match="already recorded"),
        audited_transfer(home, action=AuditAction.READ, actor="a", what="x") as audit,
    ):
        audit.done("once")
        audit.done("twice")
    assert len(home.events) == 1


def test_a_query_records_its_keys_and_matches_as_phi_and_a_failure_as_such():
    home = Recorder()
    with audited_query(home, actor="a", what="C-FIND on PACS", query={"PatientID": "MRN1"}) as q:
        q.found([STUDY])
    with (
        pytest.raises(HubUnavailable),
        audited_query(home, actor="a", what="C-FIND on PACS", query={}),
    ):
        raise HubUnavailable("no answer")
    assert home.rows() == [
        ("query", AuditOutcome.SUCCESS, "C-FIND on PACS: 1 studies"),
        ("query", AuditOutcome.SERIOUS_FAILURE, "C-FIND on PACS failed: no answer"),
    ]
    assert home.events[0].phi == {"query": {"PatientID": "MRN1"}, "studies": [STUDY]}
