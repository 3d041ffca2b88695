"""Mails go through a durable outbox: a slow or unreachable SMTP server never slows or
fails the request that seals a package, and the mail arrives once it is back."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from emix_core import generate_study, send_paths
from emix_core.testing import HubServer, free_port
from emix_core.testing.inprocess import _make


class Collector:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, _server, _session, envelope):  # noqa: N802
        self.messages.append(envelope.content)
        return "250 OK"


@pytest.fixture
def blackhole_port():
    """A port whose listener accepts connections and never says a word (a hung SMTP)."""
    port = free_port()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(16)
    yield port, listener
    listener.close()


def test_a_hung_smtp_server_neither_slows_nor_fails_the_seal_and_the_mail_comes_later(
    tmp_path: Path, blackhole_port
) -> None:
    port, listener = blackhole_port
    hub = _make(HubServer, tmp_path, f"smtp://127.0.0.1:{port}")
    assert isinstance(hub, HubServer)
    hub.start()
    try:
        study = tmp_path / "study"
        generate_study(study, slices=2, series=1, rows=32, columns=32)
        mercy, client = hub.facility_home(tmp_path, "mercy")
        started = time.monotonic()
        sent = send_paths([study], ["lakeside"], client=client, home=mercy)
        seconds = time.monotonic() - started
        assert sent.package_id and not sent.failed
        assert seconds < 5, f"the send took {seconds:.1f} s with a hung SMTP server"
        text = hub.client.get("/metrics").text
        assert 'emix_hub_mail_outbox{state="pending"} 1' in text
        _assert_nothing_readable_in_the_database(hub, "it@lakeside.example.org")

        listener.close()  # the hung server goes away; a real one comes up on its port
        collector = Collector()
        controller = Controller(collector, hostname="127.0.0.1", port=port)
        controller.start()
        try:
            deadline = time.monotonic() + 60
            while not collector.messages and time.monotonic() < deadline:
                time.sleep(0.2)
            assert len(collector.messages) == 1, "the queued notice never arrived"
            assert b"it@lakeside.example.org" in collector.messages[0]
            time.sleep(3)  # and nothing arrives twice
            assert len(collector.messages) == 1
        finally:
            controller.stop()
        text = hub.client.get("/metrics").text
        assert 'emix_hub_mail_outbox{state="sent"} 1' in text
        from emix_core.store.db import OutgoingMail

        with hub.hub.db.session() as session:
            (mail,) = session.query(OutgoingMail).all()
            assert mail.state == "sent" and mail.body == ""  # no link kept once sent
    finally:
        hub.stop()


def test_a_mail_that_never_goes_out_is_marked_failed_and_logged_without_the_address(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    from emix_core.hub import outbox

    dead = free_port()  # nothing listens here
    hub = _make(HubServer, tmp_path, f"smtp://127.0.0.1:{dead}")
    monkeypatch.setattr(outbox, "MAX_ATTEMPTS", 2)
    monkeypatch.setattr(outbox, "MAX_DELAY", 0.0)
    caplog.set_level(logging.INFO, logger="emix.mail")
    assert outbox.queue_mail(hub.hub, "dr.who@lakeside.example.org", "s", "b", "notice")
    deadline = time.monotonic() + 20
    while outbox.outbox_counts(hub.hub)["failed"] == 0 and time.monotonic() < deadline:
        outbox.deliver_due(hub.hub)
        time.sleep(0.1)
    assert outbox.outbox_counts(hub.hub) == {"pending": 0, "sent": 0, "failed": 1}
    assert "given up after 2 attempts" in caplog.text
    assert "dr.who" not in caplog.text


def _assert_nothing_readable_in_the_database(hub, address: str) -> None:
    """What a copy of the database shows of a queued mail: no address, no link."""
    from sqlalchemy import text

    with hub.hub.db.engine.connect() as connection:
        rows = connection.execute(text("SELECT * FROM mail_outbox")).all()
    assert rows
    dump = repr(rows)
    assert address not in dump and address.split("@")[0] + "@" not in dump
    assert "http" not in dump and "/p/" not in dump and "/l/" not in dump


def test_a_queued_sign_in_link_cannot_be_read_from_a_copy_of_the_database(
    tmp_path: Path,
) -> None:
    """The attacker holds a database backup taken while a sign-in mail was queued."""
    from emix_core.hub import outbox

    dead = free_port()  # the SMTP server is down: the mail stays queued
    hub = _make(HubServer, tmp_path, f"smtp://127.0.0.1:{dead}")
    body = "Sign in: https://hub.example.org/l/3q2-secret-token-xyz (valid 72 h)"
    assert outbox.queue_mail(hub.hub, "pat.doe@gmail.example", "Sign in", body, "sign-in")
    _assert_nothing_readable_in_the_database(hub, "pat.doe@gmail.example")
    from emix_core.store.db import OutgoingMail

    with hub.hub.db.session() as session:
        (mail,) = session.query(OutgoingMail).all()
        assert mail.recipient == "p***@gmail.example"  # what the operator sees
        stored = mail.body
    assert "3q2-secret-token-xyz" not in stored
    # the hub itself opens it; a hub with another key-encryption key does not
    assert outbox.open_mail(hub.hub.wrapper, mail.recipient, stored) == (
        "pat.doe@gmail.example",
        body,
    )
    from emix_core.crypto import KeyFileWrapper, create_key_file
    from emix_core.errors import IntegrityError

    other = tmp_path / "other.key"
    create_key_file(other)
    with pytest.raises(IntegrityError):
        outbox.open_mail(KeyFileWrapper(other), mail.recipient, stored)


def test_a_mail_queued_in_plain_text_by_an_older_hub_is_still_sent(tmp_path: Path) -> None:
    from emix_core.hub import outbox
    from emix_core.model import utcnow
    from emix_core.store.db import OutgoingMail

    port = free_port()
    collector = Collector()
    controller = Controller(collector, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        hub = _make(HubServer, tmp_path, f"smtp://127.0.0.1:{port}")
        with hub.hub.db.session() as session:
            session.add(
                OutgoingMail(
                    kind="notice",
                    recipient="it@lakeside.example.org",
                    subject="A package is waiting",
                    body="queued before the upgrade",
                    state="pending",
                    attempts=0,
                    created=utcnow(),
                    next_attempt=utcnow(),
                )
            )
        assert outbox.deliver_due(hub.hub) == 1
        assert len(collector.messages) == 1
        assert b"queued before the upgrade" in collector.messages[0]
        assert b"To: it@lakeside.example.org" in collector.messages[0]
    finally:
        controller.stop()
