"""The ATNA forwarder against a real audit record repository: rsyslog with its TLS driver.

rsyslog (Debian ``rsyslog`` + ``rsyslog-gnutls``) listens with ``imtcp`` over GnuTLS,
demands a client certificate signed by the test CA (mutual TLS, as ATNA wants), accepts
RFC 5425 octet-counted frames and writes each message's MSGID and body to a file.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from emix_atna import Forwarder, frame, load_settings, syslog_message
from lxml import etree

from emix_core import AuditEvent, ConfigError, LocalHome, get_plugin_manager
from emix_core.testing import emix, free_port, make_certificates, make_hub

RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
needs_rsyslog = pytest.mark.skipif(
    not (
        Path(RSYSLOGD).exists()
        and any(Path(p).joinpath("rsyslog/lmnsd_gtls.so").exists() for p in _libdirs)
    )
    if (_libdirs := ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib"])
    else True,
    reason="needs Debian rsyslog and rsyslog-gnutls (.ci/system-deps)",
)


class Rsyslog:
    """An rsyslogd on a loopback port, TLS only, client certificate required."""

    def __init__(self, folder: Path, certs, port: int) -> None:
        self.folder = folder
        self.port = port
        self.out = folder / "received.log"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "work").mkdir(exist_ok=True)
        server = certs.server.read_text()
        key_start = server.index("-----BEGIN EC PRIVATE KEY-----")
        (folder / "server.crt").write_text(server[:key_start])
        (folder / "server.key").write_text(server[key_start:])
        self.conf = folder / "rsyslog.conf"
        self.conf.write_text(
            f"""
global(workDirectory="{folder / "work"}" maxMessageSize="256k"
       defaultNetstreamDriver="gtls"
       defaultNetstreamDriverCAFile="{certs.ca}"
       defaultNetstreamDriverCertFile="{folder / "server.crt"}"
       defaultNetstreamDriverKeyFile="{folder / "server.key"}")
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1"
       streamDriver.authMode="x509/certvalid")
input(type="imtcp" port="{port}" address="127.0.0.1")
template(name="atna" type="string" string="%msgid% %app-name% %hostname% %msg%\\n")
action(type="omfile" file="{self.out}" template="atna")
"""
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(self.folder / "rsyslogd.pid")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rsyslogd exited: {self.proc.stdout.read().decode()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("rsyslogd did not listen")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)
        self.proc = None

    def messages(self) -> list[etree._Element]:
        """Every audit message written so far, in arrival order."""
        if not self.out.exists():
            return []
        found = []
        for line in self.out.read_text(encoding="utf-8").splitlines():
            msgid, app, host, body = line.split(" ", 3)
            assert (msgid, app) == ("IHE+RFC-3881", "emix")
            body = body.lstrip("\ufeff").strip()
            found.append(etree.fromstring(body.encode("utf-8")))
        return found


def details(messages: list[etree._Element]) -> list[str]:
    return [m.findtext("EventIdentification/EventOutcomeDescription") for m in messages]


def wait_for(predicate, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


@pytest.fixture
def certs(tmp_path: Path):
    return make_certificates(tmp_path / "tls")


@pytest.fixture
def repository(tmp_path: Path, certs):
    receiver = Rsyslog(tmp_path / "arr", certs, free_port())
    receiver.start()
    yield receiver
    receiver.stop()


def configure(home: Path, port: int, certs, **extra: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    lines = [
        "[atna]",
        f'url = "tls://127.0.0.1:{port}"',
        f'ca_bundle = "{certs.ca}"',
        f'client_cert = "{certs.client_cert}"',
        f'client_key = "{certs.client_key}"',
        'audit_source_id = "mercy-gw1"',
        "retry_seconds = 0.5",
    ] + [f'{k} = "{v}"' for k, v in extra.items()]
    (home / "emix.toml").write_text("\n".join(lines) + "\n")


def transfer(n: int, **phi: object) -> AuditEvent:
    return AuditEvent(
        event_type="instances-transferred",
        action="R",
        actor="dr.lee@mercy.example",
        source="10.1.2.3",
        package_id=f"pkg{n}",
        phi=phi or {"studies": [f"1.2.826.0.1.3680043.8.498.{n}"], "patients": [f"PAT-{n}"]},
        detail=f"event {n}",
    )


# --------------------------------------------------------------------------- the format


def test_a_message_is_rfc_5424_with_octet_counting_framing() -> None:
    xml = "<?xml version='1.0' encoding='UTF-8'?>\n<AuditMessage/>"
    message = syslog_message(
        xml,
        time_text="2026-12-03T09:30:00.123456Z",
        outcome=0,
        hostname="mercy gw",
        app_name="emix",
    )
    header, body = message.split(b" - \xef\xbb\xbf", 1)
    assert re.fullmatch(
        rb"<85>1 2026-12-03T09:30:00\.123456Z mercygw emix \d+ IHE\+RFC-3881", header
    )
    assert body == b"<AuditMessage/>"
    assert frame(message) == str(len(message)).encode() + b" " + message
    failure = syslog_message(xml, time_text="x", outcome=8, hostname="", app_name="emix")
    assert failure.startswith(b"<84>1 - - emix ")


# --------------------------------------------------------------------------- settings


def test_without_a_url_the_plugin_stays_idle(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("EMIX_ATNA_URL", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    (home / "emix.toml").write_text('[client]\nhub_url = "https://hub.example"\n')
    assert load_settings(home) is None
    LocalHome(home, get_plugin_manager()).audit(transfer(1))
    assert not (home / "atna-queue.db").exists()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('url = "https://arr.example:6514"', "must be tls://host:port"),
        ('url = "tls://arr.example:port"', "port that is not a number"),
        ('url = "tls://arr.example"\nca_bundle = "missing.pem"', "no such file"),
        ('url = "tls://arr.example"\nretry = 5', r"unknown setting \[atna\] retry"),
        ('url = "tls://arr.example"\nretry_seconds = "soon"', "must be a float"),
    ],
)
def test_a_wrong_setting_names_itself(tmp_path: Path, table: str, message: str) -> None:
    (tmp_path / "emix.toml").write_text(f"[atna]\n{table}\n")
    with pytest.raises(ConfigError, match=message):
        load_settings(tmp_path)


# --------------------------------------------------------------------------- real receiver


@pytest.mark.e2e
@needs_rsyslog
def test_events_reach_rsyslog_over_mutual_tls(tmp_path: Path, certs, repository) -> None:
    home = tmp_path / "home"
    configure(home, repository.port, certs)
    pm = get_plugin_manager()
    local = LocalHome(home, pm)
    local.audit(transfer(1))
    local.audit(
        transfer(
            2,
            studies=[
                {"study_uid": "1.2.3.1", "patient_id": "PAT-A"},
                {"study_uid": "1.2.3.2", "patient_id": "PAT-B"},
            ],
        )
    )
    assert wait_for(lambda: len(repository.messages()) == 3)
    first, split_a, split_b = repository.messages()
    assert first.find("AuditSourceIdentification").get("AuditSourceID") == "mercy-gw1"
    patients = [
        [
            o.get("ParticipantObjectID")
            for o in m.findall("ParticipantObjectIdentification")
            if o.get("ParticipantObjectTypeCode") == "1"
        ]
        for m in (split_a, split_b)
    ]
    assert patients == [["PAT-A"], ["PAT-B"]]
    assert details([first, split_a, split_b]) == ["event 1", "event 2", "event 2"]


@pytest.mark.e2e
@needs_rsyslog
def test_a_certificate_from_another_ca_is_refused_and_nothing_is_lost(
    tmp_path: Path, certs, repository
) -> None:
    stranger = make_certificates(tmp_path / "stranger")
    home = tmp_path / "home"
    configure(home, repository.port, certs)
    settings = load_settings(home)
    settings.client_cert, settings.client_key = str(stranger.client_cert), str(stranger.client_key)
    forwarder = Forwarder(settings)
    try:
        forwarder.record(transfer(1))
        assert not forwarder.flush(3)
        assert len(forwarder.queue) == 1 and repository.messages() == []
    finally:
        forwarder.close()


@pytest.mark.e2e
@needs_rsyslog
def test_while_the_repository_is_down_events_wait_on_disk_and_arrive_once_in_order(
    tmp_path: Path, certs, repository
) -> None:
    home = tmp_path / "home"
    configure(home, repository.port, certs)
    settings = load_settings(home)
    forwarder = Forwarder(settings)
    try:
        for n in range(1, 4):
            forwarder.record(transfer(n))
        assert wait_for(lambda: len(repository.messages()) == 3)

        repository.stop()
        for n in range(4, 10):
            forwarder.record(transfer(n))
        time.sleep(2)  # a few failed attempts (retry every 0.5 s)
        assert len(forwarder.queue) == 6
        assert settings.queue_path.stat().st_mode & 0o077 == 0  # PHI: the owner's only
        assert "unreachable" not in forwarder.last_error  # the cause, for the log
        assert forwarder.last_error

        waiting = emix("atna", "status", "--json", "--home", str(home))
        assert json.loads(waiting.stdout)["queued"] == 6

        repository.start()
        assert wait_for(lambda: len(repository.messages()) >= 9)
        assert wait_for(lambda: len(forwarder.queue) == 0)
        time.sleep(1)  # nothing more comes: no duplicates in flight
    finally:
        forwarder.close()
    got = details(repository.messages())
    assert got == [f"event {n}" for n in range(1, 10)]


@pytest.mark.e2e
@needs_rsyslog
def test_a_queue_left_by_a_stopped_process_is_sent_by_the_next(tmp_path: Path, certs) -> None:
    port = free_port()
    receiver = Rsyslog(tmp_path / "arr", certs, port)
    home = tmp_path / "home"
    configure(home, port, certs)
    settings = load_settings(home)
    settings.flush_seconds = 0.5
    first = Forwarder(settings)
    first.record(transfer(1))
    first.record(transfer(2))
    first.close()  # the process ends while the repository is down
    refused = emix("atna", "flush", "--timeout", "1", "--json", "--home", str(home), check=False)
    assert refused.returncode == 1 and json.loads(refused.stdout)["queued"] == 2
    receiver.start()
    try:
        flushed = json.loads(emix("atna", "flush", "--json", "--home", str(home)).stdout)
        assert (flushed["flushed"], flushed["queued"]) == (True, 0)
        assert details(receiver.messages()) == ["event 1", "event 2"]
        second = Forwarder(load_settings(home))
        try:
            second.record(transfer(3))
            assert wait_for(lambda: len(receiver.messages()) == 3)
        finally:
            second.close()
        assert details(receiver.messages()) == ["event 1", "event 2", "event 3"]
    finally:
        receiver.stop()


@pytest.mark.e2e
@needs_rsyslog
def test_a_hub_and_its_commands_forward_their_events(tmp_path: Path, certs, repository) -> None:
    """The hub's gunicorn worker and a short `emix hub` command both reach the repository."""
    import requests

    env = {
        "EMIX_ATNA_URL": f"tls://127.0.0.1:{repository.port}",
        "EMIX_ATNA_CA_BUNDLE": str(certs.ca),
        "EMIX_ATNA_CLIENT_CERT": str(certs.client_cert),
        "EMIX_ATNA_CLIENT_KEY": str(certs.client_key),
        "EMIX_ATNA_AUDIT_SOURCE_ID": "hub-1",
        "EMIX_ATNA_RETRY_SECONDS": "0.5",
    }
    hub = make_hub(tmp_path, env=env)
    try:
        emix(
            "hub",
            "facility",
            "add",
            "Mercy General",
            "--email",
            "admin@mercy.example.org",
            "--address",
            "mercy",
            "--home",
            str(hub.home),
            env=env,
        )
        answer = requests.get(
            f"{hub.url}/api/v1/me", headers={"Authorization": "Bearer wrong"}, timeout=10
        )
        assert answer.status_code == 401

        def codes() -> set[str]:
            return {
                m.find("EventIdentification/EventID").get("csd-code") for m in repository.messages()
            }

        assert wait_for(lambda: {"110113", "110114"} <= codes()), codes()
    finally:
        hub.stop()
    by_code = {
        m.find("EventIdentification/EventID").get("csd-code"): m for m in repository.messages()
    }
    login = by_code["110114"]
    assert login.find("EventIdentification/EventTypeCode").get("originalText") == "Login"
    assert login.find("EventIdentification").get("EventOutcomeIndicator") == "4"
    assert login.find("AuditSourceIdentification").get("AuditSourceID") == "hub-1"
    assert {p.get("NetworkAccessPointID") for p in login.findall("ActiveParticipant")} >= {
        "127.0.0.1"
    }


def test_the_plugin_is_found_by_its_entry_point() -> None:
    assert get_plugin_manager().has_plugin("atna")
