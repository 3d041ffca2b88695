"""The MLLP destination against a real MLLP server (hl7apy's) on loopback."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import emix_mllp
import pytest
from emix_mllp import MllpClient, MllpError
from emix_mllp.client import frame
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message

from emix_core import (
    ConfigError,
    Item,
    Package,
    Patient,
    PersonName,
    Report,
    get_plugin_manager,
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


@dataclass
class Engine:
    """An EMR interface engine: answers each message with the next scripted reply."""

    port: int
    script: list[str] = field(default_factory=list)  # "AA", "AE", "AR" or "silence"
    received: list[str] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    def answer(self, message: str) -> str:
        self.received.append(message)
        reply = self.script.pop(0) if self.script else "AA"
        if reply == "silence":
            self.release.wait(30)
            return ""
        control = message.split("\r")[0].split("|")[9]
        ack = (
            "MSH|^~\\&|ENGINE|EMR|EMIX||20250115120000||ACK^R01^ACK|A1|P|2.5.1\r"
            f"MSA|{reply}|{control}|{'ok' if reply == 'AA' else 'try again'}\r"
        )
        return "\x0b" + ack + "\x1c\r"

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
    assert destination.deliver(package, folder) == {"sent": 1, "already_sent": 0, "not_sent": []}
    [message] = engine.messages()
    message.validate()
    assert message.msh.msh_5.to_er7() == "EPIC" and message.msh.msh_6.to_er7() == "LAKESIDE"
    assert parse_report(pm, engine.received[0].encode()) == sample_report()
    # handed over again (after a crash, say): nothing is sent twice
    again = make_gateway(tmp_path, pm, engine).destinations[0]
    assert again.deliver(package, folder) == {"sent": 0, "already_sent": 1, "not_sent": []}
    assert len(engine.received) == 1


def test_negative_acknowledgement_is_retried_until_accepted(tmp_path, pm, engine):
    engine.script = ["AE", "AR", "AA"]
    destination = make_gateway(tmp_path, pm, engine).destinations[0]
    hl7 = render_report(pm, sample_report(), "hl7")
    package, folder = received_package(
        tmp_path, {"report.hl7": hl7}, {"report.hl7": "application/hl7-v2"}
    )
    assert destination.deliver(package, folder)["sent"] == 1
    assert len(engine.received) == 3
    controls = {m.split("\r")[0].split("|")[9] for m in engine.received}
    assert len(controls) == 1  # the same message, resent


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


def test_persistent_reject_fails_the_delivery_for_the_gateway_to_retry(tmp_path, pm, engine):
    engine.script = ["AR"] * 3
    destination = make_gateway(tmp_path, pm, engine).destinations[0]
    package, folder = received_package(
        tmp_path,
        {"report.hl7": render_report(pm, sample_report(), "hl7")},
        {"report.hl7": "application/hl7-v2"},
    )
    with pytest.raises(MllpError, match="negative acknowledgement AR"):
        destination.deliver(package, folder)
    assert len(engine.received) == 3


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
    result = destination.deliver(package, folder)
    assert result["sent"] == 1
    assert result["not_sent"] == [{"item": "item-1", "reason": result["not_sent"][0]["reason"]}]
    assert "DOCTYPE" in result["not_sent"][0]["reason"]


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
