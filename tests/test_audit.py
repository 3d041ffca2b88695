"""The hash-chained audit log: tampering detected, PHI sealed, DICOM and FHIR exports."""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from lxml import etree

from emix_core.audit.chain import (
    AUDIT_RETENTION_DAYS,
    EVENT_TYPES,
    AuditLog,
    row_hash,
    to_dicom_audit_message,
    to_fhir_audit_event,
)
from emix_core.crypto import SigningKey
from emix_core.errors import ConfigError, IntegrityError, InvalidInput
from emix_core.model import AuditEvent

PATIENT_NAME = "Müller^Hans"
PATIENT_ID = "PAT-4711-XQ"
STUDY_UID = "1.2.826.0.1.3680043.8.498.77712345"


def transfer(n: int = 0, **overrides) -> AuditEvent:
    fields = {
        "event_type": "instances-transferred",
        "action": "R",
        "outcome": 0,
        "actor": "dr.lee@mercy.example",
        "source": "10.1.2.3",
        "package_id": f"pkg{n % 3:04d}",
        "phi": {
            "patient_id": PATIENT_ID,
            "patient_name": PATIENT_NAME,
            "studies": [STUDY_UID],
        },
        "detail": f"downloaded item {n}",
    }
    fields.update(overrides)
    return AuditEvent(**fields)


@pytest.fixture
def audit_key() -> bytes:
    return os.urandom(32)


@pytest.fixture
def signing_key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def log(tmp_path: Path, audit_key: bytes, signing_key: SigningKey) -> AuditLog:
    log = AuditLog(tmp_path / "audit.db", audit_key, signing_key)
    for n in range(12):
        log.append(transfer(n))
    return log


def raw(log: AuditLog) -> sqlite3.Connection:
    """The attacker's view: the database file, without emix."""
    return sqlite3.connect(log.path, isolation_level=None)


def test_appended_events_form_a_gapless_chain_that_verifies(log: AuditLog) -> None:
    assert log.append(transfer(99, event_type="query")) == 13
    seq, head = log.head()
    assert seq == 13 and len(head) == 64
    result = log.verify()
    assert (result.ok, result.rows, result.first_bad_seq) == (True, 13, None)
    seqs = [r[0] for r in raw(log).execute("select seq from audit_events order by seq")]
    assert seqs == list(range(1, 14))


def test_a_fresh_log_verifies_and_survives_reopening(tmp_path: Path, audit_key: bytes) -> None:
    first = AuditLog(tmp_path / "audit.db", audit_key)
    assert first.verify().ok and first.head()[0] == 0
    first.append(transfer())
    again = AuditLog(tmp_path / "audit.db", audit_key)
    assert again.log_id == first.log_id
    assert again.append(transfer()) == 2 and again.verify().ok


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("outcome", 8),
        ("actor", "someone-else@mercy.example"),
        ("time", "2020-01-01T00:00:00.000000Z"),
        ("detail", "nothing happened"),
        ("hash", "0" * 64),
    ],
)
def test_an_edited_field_names_its_row(log: AuditLog, column: str, value: object) -> None:
    raw(log).execute(f"update audit_events set {column} = ? where seq = 7", (value,))
    result = log.verify()
    assert not result.ok and result.first_bad_seq == 7
    assert "row 7" in result.reason


def test_edited_phi_ciphertext_is_detected(log: AuditLog) -> None:
    db = raw(log)
    (blob,) = db.execute("select phi from audit_events where seq = 4").fetchone()
    flipped = bytes([blob[0], blob[1] ^ 1]) + blob[2:]
    db.execute("update audit_events set phi = ? where seq = 4", (flipped,))
    result = log.verify()
    assert not result.ok and result.first_bad_seq == 4 and "edited" in result.reason
    with pytest.raises(IntegrityError, match="audit row 4"):
        log.events(include_phi=True)


def test_a_deleted_middle_row_is_named(log: AuditLog) -> None:
    raw(log).execute("delete from audit_events where seq = 5")
    result = log.verify()
    assert not result.ok and result.first_bad_seq == 5
    assert result.reason == "row 5 missing (deleted)"


def test_a_deleted_row_with_renumbered_successors_is_detected(log: AuditLog) -> None:
    db = raw(log)
    db.execute("delete from audit_events where seq = 5")
    for seq in range(6, 13):
        db.execute("update audit_events set seq = ? where seq = ?", (seq - 1, seq))
    result = log.verify()
    assert not result.ok and result.first_bad_seq == 5


def test_two_swapped_rows_are_detected(log: AuditLog) -> None:
    db = raw(log)
    columns = [c[1] for c in db.execute("pragma table_info(audit_events)") if c[1] != "seq"]
    row3 = db.execute(f"select {', '.join(columns)} from audit_events where seq = 3").fetchone()
    row8 = db.execute(f"select {', '.join(columns)} from audit_events where seq = 8").fetchone()
    assignments = ", ".join(f"{c} = ?" for c in columns)
    db.execute(f"update audit_events set {assignments} where seq = 3", row8)
    db.execute(f"update audit_events set {assignments} where seq = 8", row3)
    result = log.verify()
    assert not result.ok and result.first_bad_seq == 3
    assert "does not follow row 2" in result.reason


def rewrite_from(log: AuditLog, start: int) -> None:
    """An attacker who has the code: change rows from ``start`` on and recompute the chain."""
    db = raw(log)
    db.row_factory = sqlite3.Row
    (prev,) = db.execute("select hash from audit_events where seq = ?", (start - 1,)).fetchone()
    for record in db.execute("select * from audit_events where seq >= ? order by seq", (start,)):
        row = dict(record)
        row.update(actor="nobody@nowhere.example", outcome=0, prev_hash=prev)
        prev = row["hash"] = row_hash(row)
        db.execute(
            "update audit_events set actor = ?, outcome = ?, prev_hash = ?, hash = ? where seq = ?",
            (row["actor"], row["outcome"], row["prev_hash"], row["hash"], row["seq"]),
        )


def test_a_consistently_rewritten_chain_verifies_without_checkpoints(log: AuditLog) -> None:
    rewrite_from(log, 5)
    assert log.verify().ok, "the chain alone cannot catch this: checkpoints are needed"


def test_a_rewritten_chain_is_caught_by_the_logs_own_checkpoint(log: AuditLog) -> None:
    log.checkpoint()  # covers rows 1-12
    log.append(transfer(12))
    rewrite_from(log, 5)
    result = log.verify()
    assert not result.ok and result.first_bad_seq == 12
    assert "checkpoint" in result.reason and "rewritten" in result.reason


def test_a_rewritten_chain_is_caught_by_an_external_checkpoint(log: AuditLog) -> None:
    kept_elsewhere = json.loads(json.dumps(log.checkpoint()))
    rewrite_from(log, 5)
    raw(log).execute("delete from audit_checkpoints")  # the attacker hides the local copy
    assert log.verify().ok
    result = log.verify(external_checkpoints=[kept_elsewhere])
    assert not result.ok and result.first_bad_seq == 12 and "rewritten" in result.reason


def test_a_cut_tail_is_caught_by_a_checkpoint(log: AuditLog) -> None:
    kept_elsewhere = log.checkpoint()
    db = raw(log)
    db.execute("delete from audit_events where seq >= 10")
    assert not log.verify().ok  # through the log's own checkpoint
    db.execute("delete from audit_checkpoints")
    assert log.verify().ok
    result = log.verify(external_checkpoints=[kept_elsewhere])
    assert not result.ok and result.first_bad_seq == 10
    assert "tail cut" in result.reason


def test_a_recreated_log_is_caught_by_a_checkpoint(
    log: AuditLog, tmp_path: Path, audit_key: bytes, signing_key: SigningKey
) -> None:
    kept_elsewhere = log.checkpoint()
    log.close()
    log.path.unlink()
    fresh = AuditLog(log.path, audit_key, signing_key)
    fresh.append(transfer())
    result = fresh.verify(external_checkpoints=[kept_elsewhere])
    assert not result.ok and "replaced" in result.reason


def test_a_forged_checkpoint_is_refused(
    log: AuditLog, tmp_path: Path, audit_key: bytes, signing_key: SigningKey
) -> None:
    sending_side = AuditLog(tmp_path / "local.db", audit_key, SigningKey.generate())
    genuine = log.checkpoint()
    forged = json.loads(json.dumps(genuine))
    forged["document"]["seq"] = 3
    with pytest.raises(IntegrityError):
        sending_side.store_checkpoint(forged, signing_key.public_key_b64)
    impostor = SigningKey.generate()
    with pytest.raises(IntegrityError):
        sending_side.store_checkpoint(genuine, impostor.public_key_b64)
    assert sending_side.checkpoints() == []
    # a forged checkpoint handed to verify is not trusted either
    result = log.verify(external_checkpoints=[forged])
    assert not result.ok and "forged" in result.reason


def test_the_sending_side_keeps_the_hubs_checkpoint_and_both_logs_still_verify(
    log: AuditLog, tmp_path: Path, audit_key: bytes, signing_key: SigningKey
) -> None:
    sending_side = AuditLog(tmp_path / "local.db", os.urandom(32), SigningKey.generate())
    sending_side.append(transfer(event_type="begin-transferring", action="R"))
    hub_checkpoint = log.checkpoint()
    sending_side.store_checkpoint(hub_checkpoint, signing_key.public_key_b64)
    sending_side.store_checkpoint(hub_checkpoint, signing_key.public_key_b64)  # idempotent
    assert sending_side.checkpoints() == [hub_checkpoint]
    assert sending_side.verify().ok, "another log's checkpoint does not apply to this one"
    kept = sending_side.checkpoints()
    assert log.verify(external_checkpoints=kept, public_key_b64=signing_key.public_key_b64).ok
    raw(log).execute("delete from audit_events where seq = 12")
    raw(log).execute("delete from audit_checkpoints")
    assert not log.verify(external_checkpoints=kept).ok


def test_checkpoint_needs_a_signing_key(tmp_path: Path, audit_key: bytes) -> None:
    with pytest.raises(ConfigError):
        AuditLog(tmp_path / "audit.db", audit_key).checkpoint()


def test_phi_never_reaches_the_database_files_in_plaintext(
    tmp_path: Path, audit_key: bytes, signing_key: SigningKey
) -> None:
    log = AuditLog(tmp_path / "audit.db", audit_key, signing_key)
    reader = raw(log)  # an open reader keeps the WAL file from being folded back and removed
    reader.execute("select count(*) from audit_events").fetchone()
    for n in range(30):
        log.append(transfer(n))
    log.checkpoint()
    secrets = [PATIENT_NAME, PATIENT_ID, STUDY_UID, "Müller", "Hans"]

    def assert_no_phi_in_files() -> list[str]:
        files = [p for p in tmp_path.iterdir() if p.name.startswith("audit.db")]
        for path in files:
            data = path.read_bytes()
            for secret in secrets:
                for encoding in ("utf-8", "utf-16-le", "latin-1"):
                    assert secret.encode(encoding) not in data, f"{secret!r} in {path.name}"
        return [p.name for p in files if p.stat().st_size > 0]

    assert "audit.db-wal" in assert_no_phi_in_files()
    reader.close()
    log.close()
    assert "audit.db" in assert_no_phi_in_files()
    events = log.events(package_id="pkg0001", include_phi=True)
    assert [e["seq"] for e in events] == list(range(2, 31, 3))
    assert events[0]["phi"]["patient_name"] == PATIENT_NAME
    assert "phi" not in log.events(limit=1)[0]


def test_events_filter_by_package_time_and_limit(tmp_path: Path, audit_key: bytes) -> None:
    log = AuditLog(tmp_path / "audit.db", audit_key)
    start = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
    for n in range(6):
        log.append(transfer(n, time=start + timedelta(hours=n)))
    assert [e["seq"] for e in log.events(since=start + timedelta(hours=4))] == [5, 6]
    assert [e["seq"] for e in log.events(since="2025-03-01T10:00:00+00:00", limit=2)] == [3, 4]
    assert log.events(limit=1)[0]["time"] == "2025-03-01T08:00:00.000000Z"


def test_unknown_event_types_actions_and_outcomes_are_refused(log: AuditLog) -> None:
    with pytest.raises(InvalidInput, match="event type"):
        log.append(transfer(event_type="coffee-break"))
    with pytest.raises(InvalidInput, match="action"):
        log.append(transfer(action="X"))
    with pytest.raises(InvalidInput, match="outcome"):
        log.append(transfer(outcome=3))
    assert log.head()[0] == 12


def _append_many(path: str, key: bytes, worker: int, count: int) -> None:
    log = AuditLog(Path(path), key)
    for n in range(count):
        log.append(transfer(n, detail=f"worker {worker} event {n}"))


def test_two_processes_appending_at_once_keep_one_chain(tmp_path: Path, audit_key: bytes) -> None:
    path = tmp_path / "audit.db"
    ctx = multiprocessing.get_context("spawn")
    workers = [
        ctx.Process(target=_append_many, args=(str(path), audit_key, w, 200)) for w in (1, 2)
    ]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=120)
    assert [p.exitcode for p in workers] == [0, 0]
    log = AuditLog(path, audit_key)
    result = log.verify()
    assert (result.ok, result.rows) == (True, 400)
    details = [e["detail"] for e in log.events(limit=None)]
    assert len(set(details)) == 400
    assert {d.split()[1] for d in details} == {"1", "2"}


def test_dicom_audit_message_follows_ps3_15(log: AuditLog) -> None:
    row = log.events(include_phi=True, limit=1)[0]
    row["detail"] = 'ratio <1 & "quoted"'
    root = etree.fromstring(to_dicom_audit_message(row).encode("utf-8"))
    assert root.tag == "AuditMessage"
    event_id = root.find("EventIdentification/EventID")
    assert event_id.get("csd-code") == "110104"
    assert event_id.get("codeSystemName") == "DCM"
    assert event_id.get("originalText") == "DICOM Instances Transferred"
    ident = root.find("EventIdentification")
    assert ident.get("EventActionCode") == "R" and ident.get("EventOutcomeIndicator") == "0"
    assert ident.findtext("EventOutcomeDescription") == 'ratio <1 & "quoted"'
    assert root.find("ActiveParticipant").get("UserID") == "dr.lee@mercy.example"
    assert root.find("AuditSourceIdentification").get("AuditSourceID") == "emix"
    objects = {
        o.find("ParticipantObjectIDTypeCode").get("originalText"): o
        for o in root.findall("ParticipantObjectIdentification")
    }
    assert objects["Study Instance UID"].get("ParticipantObjectID") == STUDY_UID
    patient = objects["Patient Number"]
    assert patient.get("ParticipantObjectID") == PATIENT_ID
    assert patient.findtext("ParticipantObjectName") == PATIENT_NAME
    tags = [c.tag for c in root]
    # PS3.15 A.5.1 order: event, every active participant, the audit source, the objects.
    assert tags[0] == "EventIdentification"
    assert tags[1:4] == ["ActiveParticipant"] * 3
    assert tags[4] == "AuditSourceIdentification"


def test_fhir_audit_event_is_a_valid_r4_resource(log: AuditLog) -> None:
    row = log.events(include_phi=True, limit=1)[0]
    resource = to_fhir_audit_event(row)
    assert resource["resourceType"] == "AuditEvent"
    assert resource["type"] == {
        "system": "http://dicom.nema.org/resources/ontology/DCM",
        "code": "110104",
        "display": "DICOM Instances Transferred",
    }
    assert resource["action"] == "R" and resource["outcome"] == "0"
    assert resource["recorded"] == row["time"]
    entity_names = [e["what"].get("display") for e in resource["entity"]]
    assert PATIENT_NAME in entity_names
    json.dumps(resource)  # JSON-ready
    from fhir.resources.R4B.auditevent import AuditEvent as R4AuditEvent

    parsed = R4AuditEvent.model_validate(resource)
    assert parsed.type.code == "110104" and parsed.agent[0].requestor is True


def test_every_event_type_exports(tmp_path: Path, audit_key: bytes) -> None:
    log = AuditLog(tmp_path / "audit.db", audit_key)
    for name in EVENT_TYPES:
        log.append(AuditEvent(event_type=name, phi={}))
    for row, (code, scheme, meaning) in zip(
        log.events(include_phi=True, limit=None), EVENT_TYPES.values(), strict=True
    ):
        assert to_fhir_audit_event(row)["type"]["code"] == code
        xml = etree.fromstring(to_dicom_audit_message(row).encode())
        assert xml.find("EventIdentification/EventID").get("originalText") == meaning
        assert scheme == "DCM"


def test_a_failing_audit_forwarder_never_starves_the_chain(tmp_path: Path, caplog) -> None:
    """A third-party forwarder that raises: the core's chain still records, others still run."""
    from emix_core.client.home import LocalHome
    from emix_core.plugins import get_plugin_manager, hookimpl

    class Broken:
        @hookimpl(tryfirst=True)
        def emix_audit_event(self, event: AuditEvent) -> None:
            raise RuntimeError("syslog server down")

    class Forwarder:
        def __init__(self) -> None:
            self.seen: list[str] = []

        @hookimpl
        def emix_audit_event(self, event: AuditEvent) -> None:
            self.seen.append(event.event_type)

    pm = get_plugin_manager(load_entry_points=False)
    forwarder = Forwarder()
    pm.register(forwarder, name="forwarder")
    pm.register(Broken(), name="broken-forwarder")
    home = LocalHome(tmp_path / "home", pm=pm)
    home.audit(transfer(event_type="security-alert"))
    home.audit(transfer(event_type="instances-transferred"))
    assert home.audit_log.head()[0] == 2
    assert home.audit_log.verify().ok
    assert forwarder.seen == ["security-alert", "instances-transferred"]
    assert "broken-forwarder failed in emix_audit_event" in caplog.text


def test_disabling_the_audit_chain_is_refused_loudly(monkeypatch) -> None:
    from emix_core.plugins import disabled_plugins

    monkeypatch.setenv("EMIX_DISABLED_PLUGINS", "emix.audit-recorder,emix.smtp")
    with pytest.warns(UserWarning, match="cannot be disabled"):
        assert disabled_plugins() == {"emix.smtp"}


def test_audit_records_are_kept_six_years() -> None:
    assert AUDIT_RETENTION_DAYS >= 6 * 365
