"""Administrators' second factor (TOTP and recovery codes), attacked through the hub's pages.

The attacker of these tests controls an administrator's mailbox: they can follow a mailed
sign-in link, so they hold a signed-in browser session; the administration must still be
out of reach without the administrator's phone or a recovery code.
"""

from __future__ import annotations

import json
import logging
import re
import time
from datetime import timedelta
from urllib.parse import unquote

import pyotp
import pytest
from flask import Response
from sqlalchemy import select

from emix_core import sign_in_member, verified_member
from emix_core.hub import second_factor
from emix_core.model import utcnow
from emix_core.store.db import AdminFactor, Facility, Member, RecoveryCode
from emix_core.testing import emix, emix_json

ADMIN = "admin@mercy.example.org"


class Phone:
    """The administrator's authenticator app: a fresh code for each use, as a person would
    wait for the next code (a code is accepted once; one step of drift is allowed)."""

    def __init__(self, secret: str) -> None:
        self.totp = pyotp.TOTP(secret)
        self.last = -1

    def code(self) -> str:
        now = self.totp.timecode(utcnow())
        step = max(now - 1, self.last + 1)
        while step > self.totp.timecode(utcnow()) + 1:
            time.sleep(0.5)
        self.last = step
        return self.totp.generate_otp(step)


class Browser:
    """A test client signed in as a member (as after following their mailed link)."""

    def __init__(self, hub_app, email: str) -> None:  # type: ignore[no-untyped-def]
        with hub_app.app.test_request_context():
            member = verified_member(email)
            assert member is not None
            response = sign_in_member(Response("ok"), member.member_id, detail="signed in")
        self.client = hub_app.client
        cookie = response.headers["Set-Cookie"].split(";")[0].split("=", 1)[1]
        self.client.set_cookie("emix_session", cookie)
        self.csrf = ""

    def get(self, path: str):  # type: ignore[no-untyped-def]
        page = self.client.get(path)
        found = re.search(r'name="csrf" value="([^"]+)"', page.get_data(as_text=True))
        if found:
            self.csrf = found.group(1)
        return page

    def post(self, path: str, **form: str):  # type: ignore[no-untyped-def]
        form.setdefault("csrf", self.csrf)
        return self.client.post(path, data=form)


def secret_of(page) -> str:  # type: ignore[no-untyped-def]
    found = re.search(r'id="totp-secret">([A-Z2-7 ]+)<', page.get_data(as_text=True))
    assert found, page.get_data(as_text=True)
    return found.group(1).replace(" ", "")


def recovery_codes_of(page) -> list[str]:  # type: ignore[no-untyped-def]
    return re.findall(r"<code>([A-Z2-9]{5}-[A-Z2-9]{5})</code>", page.get_data(as_text=True))


def enrol(hub_app, email: str = ADMIN) -> tuple[Browser, Phone, list[str]]:  # type: ignore[no-untyped-def]
    browser = Browser(hub_app, email)
    phone = Phone(secret_of(browser.get("/admin/2fa")))
    done = browser.post("/admin/2fa/enrol", code=phone.code(), next="/admin")
    assert done.status_code == 200, done.get_data(as_text=True)
    codes = recovery_codes_of(done)
    assert len(codes) == 10 and len(set(codes)) == 10
    return browser, phone, codes


def add_member(hub_app, email: str, role: str, facility: str = "mercy") -> None:  # type: ignore[no-untyped-def]
    with hub_app.hub.db.session() as session:
        found = session.scalar(select(Facility.id).where(Facility.address == facility))
        session.add(Member(facility_id=found, email=email, role=role, verified=True))


def audit_events(hub_app) -> list[dict]:  # type: ignore[no-untyped-def]
    return hub_app.hub.audit_log.events(limit=None, include_phi=True)


def test_admin_pages_without_the_second_factor_redirect_to_the_step_and_leak_nothing(hub_app):
    browser = Browser(hub_app, ADMIN)
    overview = browser.get("/admin")
    assert overview.status_code == 303
    assert overview.headers["Location"] == "/admin/2fa?next=/admin"
    audit = browser.get("/admin/audit?who=it%40lakeside&days=7")
    assert audit.status_code == 303
    assert (
        unquote(audit.headers["Location"].split("next=")[1])
        == "/admin/audit?who=it%40lakeside&days=7"
    )
    for page in (overview, audit):
        body = page.get_data(as_text=True)
        assert "Mercy General" not in body and "admin@mercy" not in body and "<table" not in body
    # admin actions are refused the same way: nothing is invited, no PACS named
    browser.get("/inbox")  # the session's CSRF token
    invite = browser.post("/admin/members", email="spy@mercy.example.org", role="admin")
    pacs = browser.post("/admin/pacs", name="Evil", url="https://pacs.evil.example/dicom-web")
    assert invite.status_code == pacs.status_code == 303
    assert invite.headers["Location"].startswith("/admin/2fa")
    with hub_app.hub.db.session() as session:
        assert session.scalar(select(Member).where(Member.email == "spy@mercy.example.org")) is None
    step = browser.get("/admin/2fa")
    assert step.status_code == 200 and "Set up your authenticator app" in step.get_data(
        as_text=True
    )
    # the step sends only to the administration: no open redirect
    for hostile in (
        "https://evil.example/",
        "//evil.example/admin",
        "/inbox",
        "/admin%0d%0aSet-Cookie:%20x=1",
        "/admin%5C%5Cevil.example",
    ):
        page = browser.get(f"/admin/2fa?next={hostile}")
        assert 'name="next" value="/admin"' in page.get_data(as_text=True)


def test_enrolment_shows_a_qr_code_and_completes_only_with_a_valid_code(hub_app):
    browser = Browser(hub_app, ADMIN)
    page = browser.get("/admin/2fa")
    html = page.get_data(as_text=True)
    secret = secret_of(page)
    assert len(secret) == 32  # 160 bits
    assert "<svg" in html and "<script" not in html and "style=" not in html.split("<svg")[1]
    uri = re.search(r'id="totp-uri">([^<]+)<', html).group(1).replace("&amp;", "&")
    parsed = pyotp.parse_uri(uri)
    assert parsed.secret == secret and parsed.name == ADMIN and parsed.interval == 30
    assert parsed.digits == 6 and "emix" in parsed.issuer
    assert secret_of(browser.get("/admin/2fa")) == secret  # a reload shows the same one

    wrong = browser.post(
        "/admin/2fa/enrol", code="000000" if pyotp.TOTP(secret).now() != "000000" else "111111"
    )
    assert wrong.status_code == 400 and "not right" in wrong.get_data(as_text=True)
    assert browser.get("/admin").status_code == 303  # still not enrolled, not passed

    phone = Phone(secret)
    done = browser.post("/admin/2fa/enrol", code=phone.code(), next="/admin/audit")
    assert done.status_code == 200 and len(recovery_codes_of(done)) == 10
    assert 'href="/admin/audit"' in done.get_data(as_text=True)
    overview = browser.get("/admin")
    assert overview.status_code == 200
    row = re.search(
        r"<tr>\s*<td>admin@mercy.example.org</td>.*?</tr>", overview.get_data(as_text=True), re.S
    )
    assert "Enrolled" in row.group(0)

    # the secret is sealed at rest: not in the database files, and it opens with the hub's key
    raw = b"".join(p.read_bytes() for p in hub_app.home.glob("metadata.db*"))
    assert secret.encode() not in raw
    with hub_app.hub.db.session() as session:
        factor = session.scalars(select(AdminFactor)).one()
        assert secret.encode() not in factor.secret
        assert second_factor._open(hub_app.hub, factor) == secret
        hashes = list(session.scalars(select(RecoveryCode.code_hash)))
    assert len(hashes) == 10 and all(h.startswith("$argon2id$v=19$m=19456") for h in hashes)


def test_every_new_session_passes_the_step_and_a_code_works_once(hub_app):
    first, phone, _ = enrol(hub_app)
    used = phone.totp.generate_otp(phone.last)
    attacker = Browser(hub_app, ADMIN)  # the mailbox's link: signed in, no phone
    step = attacker.get("/admin")
    assert step.status_code == 303
    page = attacker.get("/admin/2fa")
    assert "Second factor" in page.get_data(as_text=True) and "totp-secret" not in page.get_data(
        as_text=True
    )
    # the code seen over the administrator's shoulder was used already: refused
    replay = attacker.post("/admin/2fa/verify", code=used, next="/admin")
    assert replay.status_code == 400 and "used already" in replay.get_data(as_text=True)
    assert attacker.get("/admin").status_code == 303
    # the administrator's next code opens it; the first session stays signed in
    again = attacker.post("/admin/2fa/verify", code=phone.code(), next="/admin/audit")
    assert again.status_code == 303 and again.headers["Location"] == "/admin/audit"
    assert attacker.get("/admin/audit").status_code == 200
    assert first.get("/admin").status_code == 200
    events = [e for e in audit_events(hub_app) if "second factor" in (e["detail"] or "")]
    assert any(e["event_type"] == "security-alert" and "wrong code" in e["detail"] for e in events)
    assert any("passed (authenticator app)" in e["detail"] for e in events)


def test_a_recovery_code_works_once_instead_of_the_app(hub_app):
    _, _, codes = enrol(hub_app)
    lost_phone = Browser(hub_app, ADMIN)
    lost_phone.get("/admin/2fa")
    used = lost_phone.post("/admin/2fa/verify", code=codes[3].lower().replace("-", " "))
    assert used.status_code == 303 and "done=recovery" in used.headers["Location"]
    assert "9 left" in lost_phone.get(used.headers["Location"]).get_data(as_text=True)
    again = Browser(hub_app, ADMIN)
    again.get("/admin/2fa")
    refused = again.post("/admin/2fa/verify", code=codes[3])
    assert refused.status_code == 400 and again.get("/admin").status_code == 303
    assert again.post("/admin/2fa/verify", code=codes[4]).status_code == 303


def test_wrong_codes_lock_the_administrator_out_with_a_security_alert(hub_app, smtp_server):
    hub_app.hub.config.hub.alert_email = "security@hub.example.org"
    _, phone, codes = enrol(hub_app)
    attacker = Browser(hub_app, ADMIN)
    attacker.get("/admin/2fa")
    answers = [
        attacker.post("/admin/2fa/verify", code=guess).status_code
        for guess in ("123456", "654321", "AAAAA-BBBBB", "111111", "222222")
    ]
    assert answers == [400, 400, 400, 400, 429]
    # locked: even the right code and a recovery code are refused for 15 minutes
    locked = attacker.post("/admin/2fa/verify", code=phone.code())
    assert locked.status_code == 429 and "15 minutes" in locked.get_data(as_text=True)
    assert attacker.post("/admin/2fa/verify", code=codes[0]).status_code == 429
    assert attacker.get("/admin").status_code == 303
    alerts = [
        e
        for e in audit_events(hub_app)
        if e["event_type"] == "security-alert" and "second factor: wrong" in e["detail"]
    ]
    assert len(alerts) == 5 and all(e["actor"] == ADMIN for e in alerts)
    assert [e["outcome"] for e in alerts][-1] != alerts[0]["outcome"]  # the lock-out: serious
    assert "locked" in alerts[-1]["detail"]
    # the hub's operator is told, once, without a code
    deadline = time.monotonic() + 20
    mailed: list = []
    while not mailed and time.monotonic() < deadline:
        mailed = [m for m in smtp_server.messages if m["To"] == "security@hub.example.org"]
        time.sleep(0.2)
    assert len(mailed) == 1
    mail = mailed[0]
    body = mail.get_payload(decode=True).decode()
    assert "locked the second factor" in body and ADMIN in body
    assert "123456" not in body and "AAAAA" not in body
    # the administrator's own pages stay closed for the window, then open again
    with hub_app.hub.db.session() as session:
        from emix_core.store.db import Attempt

        for attempt in session.scalars(select(Attempt).where(Attempt.key == f"2fa:{ADMIN}")):
            attempt.time = utcnow() - timedelta(minutes=16)
    assert attacker.post("/admin/2fa/verify", code=phone.code()).status_code == 303


def test_a_member_who_is_not_an_administrator_never_reaches_the_enrolment(hub_app):
    add_member(hub_app, "dr.smith@mercy.example.org", "member")
    member = Browser(hub_app, "dr.smith@mercy.example.org")
    member.get("/inbox")
    assert member.get("/admin/2fa").status_code == 404
    assert member.post("/admin/2fa/enrol", code="123456").status_code == 404
    assert member.post("/admin/2fa/verify", code="123456").status_code == 404
    assert member.get("/admin").status_code == 404
    assert member.get("/inbox").status_code == 200  # members are unaffected
    with hub_app.hub.db.session() as session:
        assert session.scalar(select(AdminFactor)) is None


def test_the_second_factor_forms_need_the_sessions_csrf_token(hub_app):
    browser = Browser(hub_app, ADMIN)
    phone = Phone(secret_of(browser.get("/admin/2fa")))
    code = phone.code()
    for token in ("", "forged-token"):
        assert browser.post("/admin/2fa/enrol", code=code, csrf=token).status_code == 400
    assert browser.get("/admin").status_code == 303  # nothing enrolled, nothing passed
    assert browser.post("/admin/2fa/enrol", code=code).status_code == 200  # the code is unspent
    other = Browser(hub_app, ADMIN)
    other.get("/admin/2fa")
    token = other.csrf
    assert other.post("/admin/2fa/verify", code=phone.code(), csrf=browser.csrf).status_code == 400
    assert other.post("/admin/2fa/verify", code=phone.code(), csrf=token).status_code == 303


def test_disabling_an_administrator_ends_their_sessions(hub_app):
    add_member(hub_app, "deputy@mercy.example.org", "admin")
    boss, _, _ = enrol(hub_app)
    deputy, _, _ = enrol(hub_app, "deputy@mercy.example.org")
    assert deputy.get("/admin").status_code == 200
    overview = boss.get("/admin").get_data(as_text=True)
    row = re.search(r"<tr>\s*<td>deputy@mercy.example.org</td>.*?</tr>", overview, re.S).group(0)
    assert "Enrolled" in row
    member_id = re.search(r"/admin/members/(\d+)/disable", row).group(1)
    assert boss.post(f"/admin/members/{member_id}/disable").status_code == 303
    assert deputy.get("/admin").status_code == 401
    assert deputy.get("/inbox").status_code == 401


def test_an_administrator_resets_a_colleagues_second_factor(hub_app):
    add_member(hub_app, "deputy@mercy.example.org", "admin")
    boss, _, _ = enrol(hub_app)
    deputy, _, _ = enrol(hub_app, "deputy@mercy.example.org")
    overview = boss.get("/admin").get_data(as_text=True)
    member_id = re.search(r"/admin/members/(\d+)/reset-2fa", overview).group(1)
    done = boss.post(f"/admin/members/{member_id}/reset-2fa")
    assert done.status_code == 303 and "done=reset-2fa" in done.headers["Location"]
    assert deputy.get("/admin").status_code == 401  # their sessions ended
    row = re.search(
        r"<tr>\s*<td>deputy@mercy.example.org</td>.*?</tr>",
        boss.get("/admin").get_data(as_text=True),
        re.S,
    ).group(0)
    assert "Not enrolled" in row
    # and the next visit enrols again, with a new secret
    again = Browser(hub_app, "deputy@mercy.example.org")
    assert "Set up your authenticator app" in again.get("/admin/2fa").get_data(as_text=True)
    # nobody resets their own second factor from the page
    own = re.search(r"<tr>\s*<td>admin@mercy.example.org</td>.*?</tr>", overview, re.S).group(0)
    assert "reset-2fa" not in own


def test_the_secret_and_codes_never_reach_the_log_or_the_audit_trail(hub_app, caplog):
    caplog.set_level(logging.DEBUG)
    browser, phone, codes = enrol(hub_app)
    secret = phone.totp.secret
    other = Browser(hub_app, ADMIN)
    other.get("/admin/2fa")
    typed = [phone.code(), "999999", codes[0]]
    for code in typed:
        other.post("/admin/2fa/verify", code=code)
    trail = json.dumps(audit_events(hub_app), default=str)
    exported = emix("audit", "export", "--home", str(hub_app.home)).stdout
    for text in (caplog.text, trail, exported):
        assert secret not in text and secret.lower() not in text
        for code in codes + typed:
            assert code not in text and code.replace("-", "") not in text
    assert "second factor enrolled" in trail


def test_the_hub_operator_resets_a_lost_phone_from_the_command_line(hub_app):
    browser, phone, _ = enrol(hub_app)
    home = str(hub_app.home)
    done = emix_json("hub", "admin-reset-2fa", "--email", ADMIN.upper(), "--home", home)
    assert done == {"email": ADMIN, "reset": [{"facility": "mercy", "was_enrolled": True}]}
    assert browser.get("/admin").status_code == 401  # the session ended
    fresh = Browser(hub_app, ADMIN)
    assert secret_of(fresh.get("/admin/2fa")) != phone.totp.secret
    trail = audit_events(hub_app)
    assert any(
        e["actor"] == "hub-operator" and "second factor reset by the hub operator" in e["detail"]
        for e in trail
    )
    again = emix("hub", "admin-reset-2fa", "--email", ADMIN, "--home", home)
    assert "was not enrolled" in again.stdout
    add_member(hub_app, "dr.smith@mercy.example.org", "member")
    for email in ("nobody@mercy.example.org", "dr.smith@mercy.example.org"):
        refused = emix("hub", "admin-reset-2fa", "--email", email, "--home", home, check=False)
        assert refused.returncode == 1 and "no administrator" in refused.stderr
        assert "Traceback" not in refused.stderr


def test_a_code_is_good_for_one_step_of_drift_either_way_only():
    secret = pyotp.random_base32()
    totp = pyotp.TOTP(secret)
    now = utcnow()
    step = totp.timecode(now)
    for offset in (-1, 0, 1):
        assert (
            second_factor.matching_step(secret, totp.generate_otp(step + offset), now)
            == step + offset
        )
    for offset in (-3, 2, 5):
        code = totp.generate_otp(step + offset)
        if code not in {totp.generate_otp(step + o) for o in (-1, 0, 1)}:
            assert second_factor.matching_step(secret, code, now) is None
    for hostile in ("", "12345", "1234567", "abcdef", "12 34 5x", "１２３４５６"):
        assert second_factor.matching_step(secret, hostile, now) is None


@pytest.mark.parametrize("code", ["ABCDE-FGHJK", "abcde fghjk", "ABCDEFGHJK"])
def test_recovery_codes_are_recognised_however_they_are_typed(code):
    assert second_factor.looks_like_recovery_code(code)
    assert not second_factor.looks_like_recovery_code("123456")


def test_the_api_read_with_the_session_cookie_needs_the_second_factor_too(hub_app):
    """The cookie authenticates the API's reads (for the viewer): an administrator's lists of
    members and audit events stay closed to it until the session passed the second factor."""
    browser, phone, _ = enrol(hub_app)
    attacker = Browser(hub_app, ADMIN)
    assert attacker.client.get("/api/v1/members").status_code == 404
    assert attacker.client.get("/api/v1/me").status_code == 200  # still signed in as a member
    assert browser.client.get("/api/v1/members").status_code == 200
    attacker.get("/admin/2fa")
    assert attacker.post("/admin/2fa/verify", code=phone.code()).status_code == 303
    members = attacker.client.get("/api/v1/members")
    assert members.status_code == 200 and ADMIN in members.get_data(as_text=True)


def test_an_invited_administrator_is_told_to_have_their_phone_ready(hub_app, smtp_server):
    boss, _, _ = enrol(hub_app)
    boss.get("/admin")
    for email, role in (
        ("deputy@mercy.example.org", "admin"),
        ("dr.lee@mercy.example.org", "member"),
    ):
        assert boss.post("/admin/members", email=email, role=role).status_code == 303
    deadline = time.monotonic() + 20
    while len(smtp_server.messages) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    bodies = {m["To"]: m.get_payload(decode=True).decode() for m in smtp_server.messages}
    assert "authenticator app" in bodies["deputy@mercy.example.org"]
    assert "authenticator app" not in bodies["dr.lee@mercy.example.org"]


@pytest.mark.e2e
def test_codes_work_once_on_postgresql_too(tmp_path, postgres):
    """The single-use step and recovery codes are conditional updates: on PostgreSQL as on
    SQLite, a replayed code changes no row."""
    from types import SimpleNamespace

    from emix_core.crypto import KeyFileWrapper, create_key_file
    from emix_core.store.db import Database

    db = Database(postgres.new_database())
    db.create_all()
    create_key_file(tmp_path / "kek.key")
    hub = SimpleNamespace(
        wrapper=KeyFileWrapper(tmp_path / "kek.key"),
        config=SimpleNamespace(hub=SimpleNamespace(public_url="https://hub.example.org")),
    )
    with db.session() as session:
        session.add(Facility(address="mercy", name="Mercy", admin_email=ADMIN))
        session.flush()
        member = Member(facility_id=session.scalar(select(Facility.id)), email=ADMIN, role="admin")
        session.add(member)
        session.flush()
        member_id = member.id
        secret = second_factor.pending_secret(hub, session, member_id)
    totp = pyotp.TOTP(secret)
    now = utcnow()
    step = totp.timecode(now)
    with db.session() as session:
        codes = second_factor.complete_enrolment(
            hub, session, member_id, totp.generate_otp(step - 1), now
        )
    assert codes is not None and len(codes) == 10
    with db.session() as session:
        assert (
            second_factor.verify(hub, session, member_id, totp.generate_otp(step - 1), now) is None
        )
        assert second_factor.verify(hub, session, member_id, totp.generate_otp(step), now) == "totp"
        assert second_factor.verify(hub, session, member_id, totp.generate_otp(step), now) is None
        assert second_factor.verify(hub, session, member_id, codes[0], now) == "recovery code"
        assert second_factor.verify(hub, session, member_id, codes[0], now) is None
        assert second_factor.remaining_recovery_codes(session, member_id) == 9
    with db.session() as session:
        assert second_factor.reset(session, member_id) is True
        assert not second_factor.is_enrolled(session, member_id)
    db.engine.dispose()


def test_an_administrator_replaces_their_recovery_codes_and_the_old_ones_stop_working(hub_app):
    browser, _, old_codes = enrol(hub_app)
    page = browser.get("/admin").get_data(as_text=True)
    assert '<span id="recovery-left">10</span>' in page
    renewed = browser.post("/admin/2fa/recovery-codes")
    assert renewed.status_code == 200 and "old ones no longer work" in renewed.get_data(
        as_text=True
    )
    new_codes = recovery_codes_of(renewed)
    assert len(new_codes) == 10 and not set(new_codes) & set(old_codes)
    other = Browser(hub_app, ADMIN)
    other.get("/admin/2fa")
    assert other.post("/admin/2fa/verify", code=old_codes[0]).status_code == 400
    assert other.post("/admin/2fa/verify", code=new_codes[0]).status_code == 303
    # without the second factor, or without the CSRF token, nothing is replaced
    third = Browser(hub_app, ADMIN)
    third.get("/inbox")
    assert third.post("/admin/2fa/recovery-codes").status_code == 303
    assert browser.post("/admin/2fa/recovery-codes", csrf="forged").status_code == 400
    assert '<span id="recovery-left">9</span>' in browser.get("/admin").get_data(as_text=True)
    assert any(
        e["detail"] == "administrator's recovery codes replaced" for e in audit_events(hub_app)
    )
