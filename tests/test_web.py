"""The recipient's browser, end to end: mail, link, code, inbox, package, zip; and who gets nothing.

A real hub process, a real SMTP server, Debian's Chromium driven by Playwright.
"""

from __future__ import annotations

import io
import zipfile
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
import requests
from sqlalchemy import update

from emix_core.testing import PATIENT_ID, PATIENT_NAME, emix, emix_json, write_study_with_report
from tests.web_browser import (
    ARGS,
    CHROMIUM,
    Shots,
    code_in,
    link_in,
    mail_text,
    need_browser,
    new_context,
    wait_for_mail,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def small_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 24-slice CT in 2 series (512x512, 16-bit) with a PDF report."""
    return write_study_with_report(tmp_path_factory.mktemp("study24"), slices=24, series=2)


@pytest.fixture
def browser():  # type: ignore[no-untyped-def]
    need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


def sign_in_with_mail(page, smtp_server, link: str, mails: int, shots=None):  # type: ignore[no-untyped-def]
    """Follow a mailed link; the first time, confirm with the code of the next mail."""
    page.goto(link)
    if shots:
        shots(page, "confirm-identity")
    page.get_by_role("button", name="Email me a code").click()
    code = code_in(wait_for_mail(smtp_server, mails + 1))
    page.get_by_label("One-time code").wait_for()
    if shots:
        shots(page, "enter-code")
    page.get_by_label("One-time code").fill(code)
    page.get_by_role("button", name="Confirm").click()


def hub_db(hub):  # type: ignore[no-untyped-def]
    from emix_core.store.db import Database

    return Database(f"sqlite:///{hub.home / 'metadata.db'}")


def test_recipient_confirms_identity_reads_inbox_opens_package_and_downloads_zip(
    hub, mercy, lakeside, small_study, smtp_server, browser, tmp_path
):
    shots = Shots("recipient")
    package = emix_json("send", str(small_study), "--to", "lakeside", env=mercy.env)["package"]
    notice = wait_for_mail(smtp_server, 1)
    assert notice["To"] == "it@lakeside.example.org"
    body = mail_text(notice)
    for phi in (PATIENT_NAME, "MUSTERMANN", PATIENT_ID, "ACC-99120", package):
        assert phi not in body + str(notice["Subject"])
    link = link_in(notice)
    assert link.startswith(hub.url + "/signin/") and len(link.rsplit("/", 1)[1]) >= 43

    context = new_context(browser, accept_downloads=True)
    page = context.new_page()
    sign_in_with_mail(page, smtp_server, link, 1, shots)
    page.wait_for_url(f"**/packages/{package}")
    assert page.get_by_role("heading", name="Mustermann, Erika").is_visible()
    assert "No acute abnormality." in page.content()
    # every series preview decoded into an image
    page.wait_for_load_state("networkidle")
    widths = page.eval_on_selector_all(".series img", "els => els.map(e => e.naturalWidth)")
    assert len(widths) == 2 and all(w > 0 for w in widths)
    shots(page, "package")

    cookie = next(c for c in context.cookies() if c["name"] == "emix_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    headers = requests.get(f"{hub.url}/inbox", cookies={"emix_session": cookie["value"]}).headers
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]

    page.get_by_role("navigation").get_by_role("link", name="Inbox").click()
    row = page.locator("table.inbox tbody tr").first
    assert "Mustermann, Erika" in row.inner_text() and "mercy" in row.inner_text()
    assert "CT" in row.inner_text()
    shots(page, "inbox")

    page.goto(f"{hub.url}/packages/{package}")
    with page.expect_download() as info:
        page.get_by_role("link", name="Download as zip").click()
    saved = tmp_path / "download.zip"
    info.value.save_as(saved)
    with zipfile.ZipFile(saved) as archive:
        names = [n for n in archive.namelist() if n.endswith(".dcm")]
        assert len(names) == 24
        for name in names:
            ds = pydicom.dcmread(io.BytesIO(archive.read(name)))
            assert ds.PatientID == PATIENT_ID and ds.pixel_array.shape == (512, 512)
    assert context.outside == []

    # the link worked once
    again = context.new_page()
    again.goto(link)
    assert "expired or was already used" in again.content()
    shots(again, "link-used")

    # signing out ends the session: the same cookie opens nothing any more
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(hub.url + "/")
    shots(page, "signed-out")
    gone = requests.get(
        f"{hub.url}/packages/{package}/download.zip", cookies={"emix_session": cookie["value"]}
    )
    assert gone.status_code == 401 and b"PK" not in gone.content[:2]
    context.close()

    # the second time, the link alone signs in (identity already confirmed)
    fresh = new_context(browser)
    page = fresh.new_page()
    page.goto(hub.url + "/")
    page.get_by_label("Work email address").fill("it@lakeside.example.org")
    page.get_by_role("button", name="Email me a sign-in link").click()
    assert "Check your mail" in page.content()
    page.goto(link_in(wait_for_mail(smtp_server, 3)))
    shots(page, "welcome-back")
    page.get_by_role("button", name="Continue").click()
    page.wait_for_url("**/inbox")
    fresh.close()


def test_other_facility_logged_out_and_expired_sessions_get_nothing(
    hub, mercy, lakeside, small_study, smtp_server, browser
):
    shots = Shots("refused")
    package = emix_json("send", str(small_study), "--to", "lakeside", env=mercy.env)["package"]
    wait_for_mail(smtp_server, 1)

    # logged out: the sign-in page, never the package or its bytes
    anonymous = new_context(browser)
    page = anonymous.new_page()
    response = page.goto(f"{hub.url}/packages/{package}")
    assert response.status == 401 and "Sign in to emix" in page.content()
    shots(page, "logged-out")
    for path in ("download.zip", "preview/1.png"):
        r = requests.get(f"{hub.url}/packages/{package}/{path}")
        assert r.status_code == 401 and "Mustermann" not in r.text
    assert requests.get(f"{hub.url}/api/v1/packages/{package}/zip").status_code == 401

    # mercy's admin signs in through the web: lakeside's package does not exist for them
    page.goto(hub.url + "/")
    page.get_by_label("Work email address").fill("admin@mercy.example.org")
    page.get_by_role("button", name="Email me a sign-in link").click()
    sign_in_with_mail(page, smtp_server, link_in(wait_for_mail(smtp_server, 2)), 2)
    page.wait_for_url("**/inbox")
    assert "Nothing is waiting for you" in page.content()
    response = page.goto(f"{hub.url}/packages/{package}")
    assert response.status == 404 and "Mustermann" not in page.content()
    shots(page, "other-facility")
    cookie = next(c for c in anonymous.cookies() if c["name"] == "emix_session")["value"]
    for path in (f"/packages/{package}/download.zip", f"/api/v1/packages/{package}/zip"):
        assert requests.get(hub.url + path, cookies={"emix_session": cookie}).status_code == 404

    # idle for 16 minutes: the session has ended
    from emix_core.model import utcnow
    from emix_core.store.db import WebSession

    assert requests.get(f"{hub.url}/inbox", cookies={"emix_session": cookie}).status_code == 200
    with hub_db(hub).session() as session:
        session.execute(update(WebSession).values(last_seen=utcnow() - timedelta(minutes=16)))
    response = page.goto(f"{hub.url}/inbox")
    assert response.status == 401 and "Your session ended" in page.content()
    shots(page, "session-expired")
    anonymous.close()


def test_wrong_codes_are_throttled_per_account_and_raise_a_security_alert(
    hub, mercy, lakeside, small_study, smtp_server, browser
):
    emix_json("send", str(small_study), "--to", "lakeside", env=mercy.env)
    link = link_in(wait_for_mail(smtp_server, 1))
    context = new_context(browser)
    page = context.new_page()
    page.goto(link)
    page.get_by_role("button", name="Email me a code").click()
    code = code_in(wait_for_mail(smtp_server, 2))
    wrong = f"{(int(code) + 1) % 10**8:08d}"
    for _ in range(5):
        page.get_by_label("One-time code").fill(wrong)
        page.get_by_role("button", name="Confirm").click()
    page.get_by_label("One-time code").fill(code)
    page.get_by_role("button", name="Confirm").click()
    assert "Too many codes or wrong codes" in page.content()
    Shots("throttled")(page, "throttled")
    events = emix("audit", "export", "--home", str(hub.home)).stdout.splitlines()
    alerts = [e for e in events if "wrong confirmation code: throttled" in e]
    assert alerts, events[-3:]
    assert "it@lakeside.example.org" in alerts[0]
    context.close()


def test_forms_without_the_csrf_token_are_refused(hub, mercy, lakeside, small_study, smtp_server):
    emix_json("send", str(small_study), "--to", "lakeside", env=mercy.env)
    link = link_in(wait_for_mail(smtp_server, 1))
    r = requests.post(link, data={})
    assert r.status_code == 400
    r = requests.post(f"{hub.url}/signin", data={"email": "it@lakeside.example.org"})
    assert r.status_code == 400
    assert len(smtp_server.messages) == 1  # no code, no link was mailed


def test_cd_image_download_is_a_pdi_disc(
    hub, mercy, lakeside, small_study, smtp_server, browser, tmp_path
):
    import pycdlib

    emix_json("send", str(small_study), "--to", "lakeside", env=mercy.env)
    link = link_in(wait_for_mail(smtp_server, 1))
    context = new_context(browser, accept_downloads=True)
    page = context.new_page()
    sign_in_with_mail(page, smtp_server, link, 1)
    page.wait_for_url("**/packages/*")
    with page.expect_download() as info:
        page.get_by_role("link", name="Download as CD image (ISO)").click()
    saved = tmp_path / "disc.iso"
    info.value.save_as(saved)
    iso = pycdlib.PyCdlib()
    iso.open(str(saved))
    try:
        dicomdir = io.BytesIO()
        iso.get_file_from_iso_fp(dicomdir, iso_path="/DICOMDIR.;1")
        dicomdir.seek(0)
        ds = pydicom.dcmread(dicomdir)
        images = [r for r in ds.DirectoryRecordSequence if r.DirectoryRecordType == "IMAGE"]
        assert len(images) == 24
    finally:
        iso.close()
    context.close()
