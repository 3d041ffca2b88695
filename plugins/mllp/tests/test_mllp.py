"""The MLLP destination against a real MLLP server (hl7apy's) on loopback."""

from __future__ import annotations

import hashlib
import socket
import socketserver
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import emix_mllp
import pytest
from emix_mllp import MllpClient, MllpError
from emix_mllp.client import frame
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message

from emix_core import (
    AuditOutcome,
    ConfigError,
    Item,
    Package,
    Patient,
    PersonName,
    Report,
    get_plugin_manager,
    hookimpl,
    item_relative_path,
    load_gateway,
    parse_report,
    registered_kinds,
    render_report,
)

PLUGIN_ROOT = Path(__file__).resolve().parent.parent
STUDY = {
    "study_uid": "1.2.826.0.1.3680043.8.498.777",
    "patient_name": "MUSTERMANN^ERIKA",
    "patient_id": "PID-7734-XQ",
    "accession_number": "ACC-99120",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AuditRecorder:
    """A plugin that keeps the audit events of the MLLP destination."""

    def __init__(self) -> None:
        self.events: list = []

    @hookimpl
    def emix_audit_event(self, event) -> None:  # type: ignore[no-untyped-def]
        if event.event_type == "export":
            self.events.append(event)


def ack_frame(code: str, control: str, *, wants_ack: bool = False) -> str:
    """One framed ACK (MSH-15 ``AL`` when it asks to be acknowledged in turn)."""
    accept = "AL" if wants_ack else ""
    ack = (
        f"MSH|^~\\&|ENGINE|EMR|EMIX||20250115120000||ACK^R01^ACK|A-{code}|P|2.5.1|||{accept}\r"
        f"MSA|{code}|{control}|{'ok' if code in ('AA', 'CA') else 'Müller: unknown PID'}\r"
    )
    return "\x0b" + ack + "\x1c\r"


@dataclass
class Engine:
    """An EMR interface engine: answers each message with the next scripted reply.

    A reply is an ACK code (``AA``, ``AE``, ``AR``, ``CA``, ``CE``, ``CR``), several
    sent one after the other (``CA+AA``: a commit, then the application ACK), or
    ``silence`` (no answer until the test ends).
    """

    port: int
    script: list[str] = field(default_factory=list)
    received: list[str] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    def answer(self, message: str) -> str:
        self.received.append(message)
        reply = self.script.pop(0) if self.script else "AA"
        if reply == "silence":
            self.release.wait(30)
            return ""
        control = message.split("\r")[0].split("|")[9]
        return "".join(ack_frame(code, control) for code in reply.split("+"))

    def messages(self) -> list:
        return [
            parse_message(m, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
            for m in self.received
        ]


@pytest.fixture
def engine() -> Iterator[Engine]:
    engine = Engine(port=free_port())

    class Handler(AbstractHandler):
        def reply(self) -> str:
            return engine.answer(self.incoming_message)

    handlers = {"ORU^R01^ORU_R01": (Handler,), "ORU^R01": (Handler,)}
    server = MLLPServer("127.0.0.1", engine.port, handlers, timeout=30)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield engine
    finally:
        engine.release.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def pm():
    pm = get_plugin_manager(load_entry_points=False)
    if not pm.has_plugin("mllp"):
        pm.register(emix_mllp, name="mllp")  # what the entry point does once installed
    return pm


def make_gateway(tmp_path: Path, pm, engine: Engine, **settings):  # type: ignore[no-untyped-def]
    """A real gateway built from gateway.toml, with one mllp destination."""
    options = {"timeout": 2, "retries": 2, "backoff": 0.05, **settings}
    lines = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in options.items())
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[gateway]\nhub_url = "http://127.0.0.1:9"\ntoken = "t"\nhome = "home"\n\n'
        f'[[destinations]]\nkind = "mllp"\nhost = "127.0.0.1"\nport = {engine.port}\n'
        f'receiving_application = "EPIC"\nreceiving_facility = "LAKESIDE"\n{lines}\n'
    )
    return load_gateway(config, pm=pm)


def received_package(tmp_path: Path, files: dict[str, bytes], media_types: dict[str, str]):
    """A package folder laid out as the receiving side writes it."""
    folder = tmp_path / "spool" / "pkg"
    items = []
    for number, (name, data) in enumerate(files.items(), start=1):
        item = Item(
            id=number,
            name=name,
            media_type=media_types[name],
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )
        target = folder / item_relative_path(item)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        items.append(item)
    package = Package(id="a1b2c3d4e5f6", sender="mercy", items=items, studies=[STUDY])
    return package, folder


def sample_report() -> Report:
    return Report(
        patient=Patient(PersonName("Müller", "Hans"), "PID-1", "MERCY", sex="M"),
        accession_number="ACC-1",
        study_instance_uid="1.2.826.0.1.3680043.8.498.1",
        findings="No acute findings.",
        impression="Normal CT head.",
        facility="Mercy General",
    )


# --------------------------------------------------------------------------- tests


def test_the_plugin_registers_the_mllp_destination_kind(pm):
    _, destinations = registered_kinds(pm)
    assert "mllp" in destinations
    project = tomllib.loads((PLUGIN_ROOT / "pyproject.toml").read_text())
    assert project["project"]["name"] == "emix-mllp"
    assert project["project"]["entry-points"]["emix"] == {"mllp": "emix_mllp"}


def test_acknowledged_report_is_sent_once_as_a_valid_oru(tmp_path, pm, engine):
    gateway = make_gateway(tmp_path, pm, engine)
    destination = gateway.destinations[0]
    cda = render_report(pm, sample_report(), "cda")
    package, folder = received_package(
        tmp_path, {"report.xml": cda}, {"report.xml": "application/cda+xml"}
    )
    result = destination.deliver(package, folder)
    [message] = engine.messages()
    message.validate()
    control = message.msh.msh_10.to_er7()
    assert result == {
        "sent": 1,
        "already_sent": 0,
        "rejected": 0,
        "not_sent": [],
        "messages": [
            {"item": "item-1", "control_id": control, "outcome": "accepted", "ack": "AA",
             "attempts": 1}
        ],
    }  # fmt: skip
    assert message.msh.msh_5.to_er7() == "EPIC" and message.msh.msh_6.to_er7() == "LAKESIDE"
    assert parse_report(pm, engine.received[0].encode()) == sample_report()
    # handed over again (after a crash, say): nothing is sent twice
    again = make_gateway(tmp_path, pm, engine).destinations[0]
    result = again.deliver(package, folder)
    assert (result["sent"], result["already_sent"]) == (0, 1)
    assert result["messages"] == [
        {"item": "item-1", "control_id": control, "outcome": "already_accepted"}
    ]
    assert len(engine.received) == 1


def test_application_and_commit_errors_are_retried_until_accepted(tmp_path, pm, engine):
    engine.script = ["AE", "CE", "AA"]
    destination = make_gateway(tmp_path, pm, engine).destinations[0]
    hl7 = render_report(pm, sample_report(), "hl7")
    package, folder = received_package(
        tmp_path, {"report.hl7": hl7}, {"report.hl7": "application/hl7-v2"}
    )
    result = destination.deliver(package, folder)
    assert result["sent"] == 1 and result["messages"][0]["attempts"] == 3
    assert len(engine.received) == 3
    assert len(set(engine.received)) == 1  # the same bytes, resent


def test_timeout_is_retried_then_reported_without_phi(tmp_path, pm, engine):
    engine.script = ["silence", "silence"]
    destination = make_gateway(tmp_path, pm, engine, timeout=0.3, retries=1).destinations[0]
    package, folder = received_package(
        tmp_path,
        {"report.hl7": render_report(pm, sample_report(), "hl7")},
        {"report.hl7": "application/hl7-v2"},
    )
    started = time.monotonic()
    with pytest.raises(MllpError, match="after 2 attempts: no acknowledgement within 0.3 s") as e:
        destination.deliver(package, folder)
    assert time.monotonic() - started < 5
    assert len(engine.received) == 2
    assert "Müller" not in e.value.message and "PID-1" not in e.value.message
    # the engine is back: the gateway's next attempt delivers
    assert destination.deliver(package, folder)["sent"] == 1


@pytest.mark.parametrize("code", ["AR", "CR"])
def test_an_application_reject_is_final_and_never_resent(tmp_path, pm, engine, code):
    engine.script = [code]
    audit = AuditRecorder()
    pm.register(audit)
    try:
        destination = make_gateway(tmp_path, pm, engine).destinations[0]
        package, folder = received_package(
            tmp_path,
            {"report.hl7": render_report(pm, sample_report(), "hl7")},
            {"report.hl7": "application/hl7-v2"},
        )
        result = destination.deliver(package, folder)  # no exception: nothing to retry
        assert (result["sent"], result["rejected"]) == (0, 1)
        [message] = result["messages"]
        assert (message["outcome"], message["ack"], message["attempts"]) == ("rejected", code, 1)
        assert len(engine.received) == 1
        # the gateway hands the package over again: the rejected bytes are not resent
        again = make_gateway(tmp_path, pm, engine).destinations[0].deliver(package, folder)
        assert again["messages"][0]["outcome"] == "already_rejected"
        assert len(engine.received) == 1
        [event] = audit.events
        assert event.outcome == AuditOutcome.SERIOUS_FAILURE and event.event_type == "export"
        assert f"rejected ({code})" in event.detail and message["control_id"] in event.detail
        assert "Müller" not in event.detail and "PID-1" not in event.detail
    finally:
        pm.unregister(audit)


def test_pdf_report_travels_as_an_attachment_with_the_package_subject(tmp_path, pm, engine):
    pdf = render_report(pm, sample_report(), "pdf")
    destination = make_gateway(tmp_path, pm, engine).destinations[0]
    package, folder = received_package(
        tmp_path,
        {"report.pdf": pdf, "image.dcm": b"\0" * 132},
        {"report.pdf": "application/pdf", "image.dcm": "application/dicom"},
    )
    assert destination.deliver(package, folder)["sent"] == 1
    report = parse_report(pm, engine.received[0].encode())
    assert report.attachments[0].data == pdf
    assert report.patient.id == "PID-7734-XQ" and report.accession_number == "ACC-99120"
    assert report.study_instance_uid == STUDY["study_uid"]


def test_unreadable_report_is_listed_and_the_rest_is_sent(tmp_path, pm, engine):
    hostile = (
        b'<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
        b'<ClinicalDocument xmlns="urn:hl7-org:v3">&e;</ClinicalDocument>'
    )
    destination = make_gateway(tmp_path, pm, engine).destinations[0]
    package, folder = received_package(
        tmp_path,
        {"bad.xml": hostile, "good.json": render_report(pm, sample_report(), "fhir")},
        {"bad.xml": "application/cda+xml", "good.json": "application/fhir+json"},
    )
    audit = AuditRecorder()
    pm.register(audit)
    try:
        result = destination.deliver(package, folder)
    finally:
        pm.unregister(audit)
    assert result["sent"] == 1
    assert result["not_sent"] == [{"item": "item-1", "reason": result["not_sent"][0]["reason"]}]
    assert "DOCTYPE" in result["not_sent"][0]["reason"]
    unreadable, sent = audit.events
    assert unreadable.outcome == AuditOutcome.SERIOUS_FAILURE
    assert "item-1" in unreadable.detail and "not sent, unreadable" in unreadable.detail
    assert sent.outcome == AuditOutcome.SUCCESS and "item-2" in sent.detail


def test_client_reads_a_fragmented_ack_and_refuses_one_for_another_message():
    port = free_port()
    listener = socket.create_server(("127.0.0.1", port))
    replies = [b"MSA|AA|OTHER-ID\r", b"MSA|AA|CTRL-1\r"]

    def serve() -> None:
        for reply in replies:
            conn, _ = listener.accept()
            with conn:
                buffer = b""
                while not buffer.endswith(b"\x1c\r"):
                    buffer += conn.recv(4096)
                ack = b"noise\x0bMSH|^~\\&|E||||||ACK|1|P|2.5.1\r" + reply + b"\x1c\r"
                for i in range(0, len(ack), 7):  # in small pieces
                    conn.sendall(ack[i : i + 7])
                    time.sleep(0.001)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client = MllpClient("127.0.0.1", port, timeout=2, retries=1, backoff=0.01)
        message = b"MSH|^~\\&|EMIX||||20250101||ORU^R01^ORU_R01|CTRL-1|P|2.5.1\r"
        ack = client.send(message)
        assert (ack.code, ack.control_id, client.attempts) == ("AA", "CTRL-1", 2)
    finally:
        thread.join(5)
        listener.close()


def test_connection_refused_is_retried_and_then_an_error():
    client = MllpClient("127.0.0.1", free_port(), timeout=1, retries=2, backoff=0.01)
    with pytest.raises(MllpError, match="after 3 attempts: connection failed"):
        client.send(b"MSH|^~\\&|EMIX||||20250101||ORU^R01|C|P|2.5.1\r")


def test_framing_bytes_inside_a_message_are_refused():
    with pytest.raises(MllpError, match="framing byte"):
        frame(b"MSH|^~\\&|\x1c\r")
    assert frame(b"MSH|x\r") == b"\x0bMSH|x\r\x1c\r"


def test_missing_or_unknown_settings_are_config_errors(tmp_path, pm, engine):
    with pytest.raises(ConfigError, match="unknown setting"):
        make_gateway(tmp_path, pm, engine, colour="blue")
    with pytest.raises(ConfigError, match="host"):
        emix_mllp.MllpDestination({"kind": "mllp", "host": "127.0.0.1"}, None)


# --------------------------------------------------------------------------- enhanced mode


def hl7_package(tmp_path: Path, pm, report: Report | None = None):  # type: ignore[no-untyped-def]
    return received_package(
        tmp_path,
        {"report.hl7": render_report(pm, report or sample_report(), "hl7")},
        {"report.hl7": "application/hl7-v2"},
    )


def test_enhanced_mode_commit_then_application_accept(tmp_path, pm, engine):
    engine.script = ["CA+AA"]
    destination = make_gateway(tmp_path, pm, engine, ack_mode="enhanced").destinations[0]
    result = destination.deliver(*hl7_package(tmp_path, pm))
    [message] = result["messages"]
    assert (message["outcome"], message["commit"], message["ack"]) == ("accepted", "CA", "AA")
    [sent] = engine.messages()
    assert (sent.msh.msh_15.to_er7(), sent.msh.msh_16.to_er7()) == ("AL", "AL")


def test_enhanced_mode_commit_then_application_reject_is_final(tmp_path, pm, engine):
    engine.script = ["CA+AR"]
    destination = make_gateway(tmp_path, pm, engine, ack_mode="enhanced").destinations[0]
    result = destination.deliver(*hl7_package(tmp_path, pm))
    assert result["rejected"] == 1 and result["messages"][0]["ack"] == "AR"
    assert len(engine.received) == 1


def test_enhanced_mode_commit_without_application_ack_is_committed_not_resent(tmp_path, pm, engine):
    engine.script = ["CA"]  # the engine commits, then closes the connection
    gateway = make_gateway(tmp_path, pm, engine, ack_mode="enhanced", application_ack_timeout=1)
    package, folder = hl7_package(tmp_path, pm)
    result = gateway.destinations[0].deliver(package, folder)
    assert result["messages"][0]["outcome"] == "committed" and result["sent"] == 1
    again = make_gateway(tmp_path, pm, engine, ack_mode="enhanced").destinations[0]
    assert again.deliver(package, folder)["messages"][0]["outcome"] == "already_committed"
    assert len(engine.received) == 1


def test_original_mode_takes_a_commit_accept_as_accepted(tmp_path, pm, engine):
    engine.script = ["CA"]
    destination = make_gateway(tmp_path, pm, engine).destinations[0]
    result = destination.deliver(*hl7_package(tmp_path, pm))
    assert result["messages"][0]["outcome"] == "accepted"
    assert engine.messages()[0].msh.msh_15.to_er7() == ""


class SlowEngine(socketserver.ThreadingTCPServer):
    """Commits at once, sends the application ACK later on the same connection (asking
    for a commit accept), and keeps what the sender answers to it."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.answers: list[bytes] = []
        super().__init__(("127.0.0.1", 0), self.Handler)

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            server: SlowEngine = self.server  # type: ignore[assignment]
            self.request.settimeout(5)
            data = b""
            while not data.endswith(b"\x1c\r"):
                data += self.request.recv(4096)
            control = data[1:].split(b"\r")[0].split(b"|")[9].decode()
            self.request.sendall(ack_frame("CA", control).encode())
            time.sleep(server.delay)
            self.request.sendall(ack_frame("AA", control, wants_ack=True).encode())
            answer = b""
            while not answer.endswith(b"\x1c\r"):
                chunk = self.request.recv(4096)
                if not chunk:
                    break
                answer += chunk
            server.answers.append(answer)


def test_enhanced_mode_waits_for_a_late_application_ack_and_acknowledges_it(pm):
    server = SlowEngine(delay=0.4)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = MllpClient(
            "127.0.0.1", server.server_address[1], timeout=0.2, enhanced=True,
            application_ack_timeout=3, retries=0,
        )  # fmt: skip
        message = render_report(pm, sample_report(), "hl7")
        delivery = client.deliver(message)
        assert (delivery.outcome, delivery.commit.code, delivery.ack.code) == (
            "accepted",
            "CA",
            "AA",
        )
        deadline = time.monotonic() + 5
        while not server.answers and time.monotonic() < deadline:
            time.sleep(0.01)
        [answer] = server.answers
        assert b"MSA|CA|A-AA" in answer  # our commit accept of the engine's application ACK
    finally:
        server.shutdown()
        server.server_close()


def test_every_message_is_audited_with_its_outcome(tmp_path, pm, engine):
    engine.script = ["AA", "silence"]
    audit = AuditRecorder()
    pm.register(audit)
    try:
        destination = make_gateway(tmp_path, pm, engine, timeout=0.3, retries=0).destinations[0]
        first, second = sample_report(), replace(sample_report(), impression="Haemorrhage.")
        package, folder = received_package(
            tmp_path,
            {"a.hl7": render_report(pm, first, "hl7"), "b.hl7": render_report(pm, second, "hl7")},
            {"a.hl7": "application/hl7-v2", "b.hl7": "application/hl7-v2"},
        )
        with pytest.raises(MllpError, match="no acknowledgement"):
            destination.deliver(package, folder)
        accepted, failed = audit.events
        assert accepted.outcome == AuditOutcome.SUCCESS and "accepted (AA)" in accepted.detail
        assert failed.outcome == AuditOutcome.MINOR_FAILURE
        assert "not acknowledged, to be retried" in failed.detail
        assert all(e.package_id == package.id and e.phi["studies"] for e in audit.events)
    finally:
        pm.unregister(audit)


def test_the_same_report_sent_again_carries_the_same_control_id(tmp_path, pm, engine):
    destination = make_gateway(tmp_path, pm, engine).destinations[0]
    cda = render_report(pm, sample_report(), "cda")
    for name in ("first", "second"):  # the sender sends its report twice, in two packages
        package, folder = received_package(
            tmp_path / name, {"report.xml": cda}, {"report.xml": "application/cda+xml"}
        )
        destination.deliver(replace(package, id=f"{name}-package-0001"), folder)
    first, second = (m.msh.msh_10.to_er7() for m in engine.messages())
    assert first == second


def test_a_bad_ack_mode_is_a_config_error(tmp_path, pm, engine):
    with pytest.raises(ConfigError, match="ack_mode"):
        make_gateway(tmp_path, pm, engine, ack_mode="fast")


def test_reports_are_issued_under_the_gateway_homes_facility_oid(tmp_path, pm, engine):
    home = tmp_path / "home"
    home.mkdir()
    (home / "emix.toml").write_text('[identifiers]\nfacility_oid = "2.999.4711.9"\n')
    destination = make_gateway(tmp_path, pm, engine).destinations[0]
    pdf = render_report(pm, sample_report(), "pdf")  # a PDF carries no ids of its own
    package, folder = received_package(
        tmp_path, {"report.pdf": pdf}, {"report.pdf": "application/pdf"}
    )
    destination.deliver(package, folder)
    [message] = engine.received  # an ED with a whole PDF: past hl7apy's strict lengths
    msh = message.split("\r")[0].split("|")
    assert (msh[2], msh[3]) == ("EMIX", "^2.999.4711.9^ISO")
