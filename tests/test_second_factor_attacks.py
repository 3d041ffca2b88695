"""The administrators' second factor attacked from a second browser: parallel guesses
against the throttle, a pending enrolment watched from another session, two first visits
at once, and a session cookie known before the step.

The attacker holds the administrator's mailbox (a signed-in browser session of their own)
but not their phone.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pyotp
import requests
from flask import Response
from sqlalchemy import select

from emix_core import sign_in_member, verified_member
from emix_core.hub import second_factor
from emix_core.store.db import AdminFactor
from tests.test_web_second_factor import ADMIN, Browser, Phone, audit_events, enrol, secret_of


def session_cookie(hub_app, email: str = ADMIN) -> str:  # type: ignore[no-untyped-def]
    """The cookie of a fresh browser session of a member (as after their mailed link)."""
    with hub_app.app.test_request_context():
        member = verified_member(email)
        assert member is not None
        response = sign_in_member(Response("ok"), member.member_id, detail="signed in")
    return response.headers["Set-Cookie"].split(";")[0].split("=", 1)[1]


def csrf_of(html: str) -> str:
    return html.split('name="csrf" value="', 1)[1].split('"', 1)[0]


def wrong_guesses(count: int) -> list[str]:
    """Recovery-code-shaped guesses: each is checked against ten Argon2id hashes, the
    widest window a racing attacker can hope for."""
    alphabet = second_factor.RECOVERY_ALPHABET
    return [f"{alphabet[i % 32] * 5}-{alphabet[(i * 7) % 32] * 5}" for i in range(count)]


def test_parallel_guesses_are_checked_no_more_often_than_the_throttle_allows(hub_server):
    """Twelve guesses posted at the same instant from twelve connections: at most five
    are checked (the throttle counts before it checks), the rest wait out the lock."""
    enrol(hub_server)
    cookie = session_cookie(hub_server)
    first = requests.get(f"{hub_server.url}/admin/2fa", cookies={"emix_session": cookie})
    csrf = csrf_of(first.text)
    guesses = wrong_guesses(12)
    start = threading.Barrier(len(guesses))

    def guess(code: str) -> int:
        start.wait()
        return requests.post(
            f"{hub_server.url}/admin/2fa/verify",
            data={"code": code, "csrf": csrf, "next": "/admin"},
            cookies={"emix_session": cookie},
            allow_redirects=False,
            timeout=60,
        ).status_code

    with ThreadPoolExecutor(len(guesses)) as pool:
        answers = list(pool.map(guess, guesses))
    assert set(answers) <= {400, 429}, answers
    checked = [
        e
        for e in audit_events(hub_server)
        if e["event_type"] == "security-alert" and "second factor: wrong" in e["detail"]
    ]
    assert len(checked) <= 5, f"{len(checked)} guesses were checked; answers {answers}"
    assert answers.count(400) <= 4 and answers.count(429) >= 8


def test_a_pending_enrolment_secret_is_shown_only_to_the_browser_that_started_it(hub_app):
    """An administrator is setting up their phone; someone with their mailbox opens the
    step in another browser at that moment: they must not see (and later hold) the secret
    the administrator is about to enrol."""
    admin = Browser(hub_app, ADMIN)
    secret = secret_of(admin.get("/admin/2fa"))
    attacker = Browser(hub_app, ADMIN)
    page = attacker.get("/admin/2fa")
    html = page.get_data(as_text=True)
    assert secret not in html.replace(" ", "")
    assert "totp-secret" not in html and "otpauth://" not in html
    assert "another browser" in html
    # the administrator finishes on their own browser, with the secret they were shown
    assert secret_of(admin.get("/admin/2fa")) == secret
    phone = Phone(secret)
    assert admin.post("/admin/2fa/enrol", code=phone.code(), next="/admin").status_code == 200
    assert admin.get("/admin").status_code == 200
    # the attacker's browser cannot complete an enrolment of its own either
    attacker.get("/admin/2fa")
    refused = attacker.post("/admin/2fa/enrol", code=pyotp.TOTP(secret).now())
    assert refused.status_code == 303 and attacker.get("/admin").status_code == 303
    assert any(
        e["event_type"] == "security-alert" and "another browser" in (e["detail"] or "")
        for e in audit_events(hub_app)
    )


def test_a_pending_enrolment_of_a_browser_that_left_can_be_started_again(hub_app):
    """The browser that started an enrolment signed out (or its session ended): the next
    browser starts afresh with a secret of its own, never the abandoned one."""
    gone = Browser(hub_app, ADMIN)
    abandoned = secret_of(gone.get("/admin/2fa"))
    gone.post("/logout")
    fresh = Browser(hub_app, ADMIN)
    secret = secret_of(fresh.get("/admin/2fa"))
    assert secret != abandoned
    phone = Phone(secret)
    assert fresh.post("/admin/2fa/enrol", code=phone.code()).status_code == 200


def test_two_first_visits_at_the_same_instant_get_pages_not_errors(hub_server, monkeypatch):
    """Two tabs (or two browsers) open the step for the first time at once: each gets a
    page, one enrolment is pending, and nothing answers 500."""
    sealing = second_factor._seal

    def slow_seal(*args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(0.5)  # hold the gap between "none yet" and the insert open
        return sealing(*args, **kwargs)

    monkeypatch.setattr(second_factor, "_seal", slow_seal)
    same = session_cookie(hub_server)
    two = [session_cookie(hub_server), session_cookie(hub_server)]
    for cookies, answers in (([same, same], [200, 200]), (two, [200, 409])):
        with hub_server.hub.db.session() as session:
            session.query(AdminFactor).delete()
        start = threading.Barrier(2)

        def visit(cookie: str, start: threading.Barrier = start) -> requests.Response:
            start.wait()
            return requests.get(
                f"{hub_server.url}/admin/2fa", cookies={"emix_session": cookie}, timeout=60
            )

        with ThreadPoolExecutor(2) as pool:
            pages = list(pool.map(visit, cookies))
        # two tabs of one browser both show the set-up; of two browsers, the second is
        # told that the first is setting up
        assert sorted(p.status_code for p in pages) == answers, [p.text[-300:] for p in pages]
        with hub_server.hub.db.session() as session:
            assert len(session.scalars(select(AdminFactor)).all()) == 1
        shown = {
            p.text.split('id="totp-secret">')[1].split("<")[0] for p in pages if "totp-" in p.text
        }
        assert len(shown) == 1  # one secret, shown to the browser that owns it


def test_passing_the_second_factor_gives_the_browser_a_new_session(hub_app):
    """A session cookie known before the step (planted, or read off the machine) gains
    nothing when the administrator passes the second factor in it: the browser then gets
    a new session, and the old cookie is signed out."""
    _, phone, _ = enrol(hub_app)
    browser = Browser(hub_app, ADMIN)
    known = browser.client.get_cookie("emix_session").value
    browser.get("/admin/2fa")
    passed = browser.post("/admin/2fa/verify", code=phone.code(), next="/admin")
    assert passed.status_code == 303
    rotated = browser.client.get_cookie("emix_session").value
    assert rotated != known
    assert browser.get("/admin").status_code == 200  # the new session works, with a new token
    planted = hub_app.app.test_client()
    planted.set_cookie("emix_session", known)
    assert planted.get("/admin").status_code == 401
    assert planted.get("/api/v1/members").status_code == 401


def test_a_colleagues_package_stays_closed_to_an_administrators_mailbox(hub_server, tmp_path):
    """An administrator may read packages sent to one member of their facility: that is an
    administrator's right, so a session that has not passed the second factor (someone with
    the mailbox only) does not have it; the administrator's own and the facility's stay open."""
    from emix_core import generate_study, send_paths
    from emix_core.model import utcnow
    from emix_core.store.db import Facility, Member

    with hub_server.hub.db.session() as session:
        mercy = session.scalar(select(Facility.id).where(Facility.address == "mercy"))
        session.add(
            Member(
                facility_id=mercy,
                email="dr.smith@mercy.example.org",
                role="member",
                verified=True,
                confirmed_at=utcnow(),
            )
        )
    generate_study(tmp_path / "study", slices=1, series=1)
    home, client = hub_server.facility_home(tmp_path, "lakeside")
    for_smith = send_paths(
        [tmp_path / "study"], ["dr.smith@mercy.example.org"], client=client, home=home
    ).package_id
    for_mercy = send_paths([tmp_path / "study"], ["mercy"], client=client, home=home).package_id

    mailbox = Browser(hub_server, ADMIN)
    assert mailbox.get(f"/packages/{for_smith}").status_code == 404
    assert mailbox.client.get(f"/api/v1/packages/{for_smith}").status_code == 404
    listed = mailbox.client.get("/api/v1/inbox").get_data(as_text=True)
    assert for_smith not in listed and for_mercy in listed
    assert mailbox.get(f"/packages/{for_mercy}").status_code == 200
    # with the phone, the administrator reads it
    browser, _, _ = enrol(hub_server)
    assert browser.get(f"/packages/{for_smith}").status_code == 200
    assert for_smith in browser.client.get("/api/v1/inbox").get_data(as_text=True)


def test_a_crafted_notice_link_gets_the_page_not_an_error(hub_app):
    """``/admin?done=recovery&left=…`` is a link anyone can send an administrator."""
    browser, _, _ = enrol(hub_app)
    for left in ("9" * 5000, "-1", "%00", "١٢"):
        page = browser.get(f"/admin?done=recovery&left={left}")
        assert page.status_code == 200, left
        assert "9" * 50 not in page.get_data(as_text=True)


def test_a_plugins_page_gives_an_administrator_no_more_than_a_members_rights(hub_app):
    """A plugin signs a member in by its own means (an EMR's launch): the principal it gets
    for an administrator has not passed the hub's second factor, so a colleague's package
    or the administration's lists stay as closed as in a browser before the step."""
    from emix_core import member_principal

    with hub_app.app.test_request_context():
        admin = member_principal(verified_member(ADMIN).member_id)
        assert admin is not None and admin.is_admin and admin.second_factor is False
