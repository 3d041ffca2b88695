"""Administrators' pages, patient access and usage metering, through a real hub and browser."""

from __future__ import annotations

import re
import zipfile

import pydicom
import pytest
import requests

from emix_core.model import utcnow
from emix_core.testing import PATIENT_ID, emix, emix_json
from tests.test_web import browser, sign_in_with_mail, small_study  # noqa: F401  (fixtures)
from tests.web_browser import (
    Authenticator,
    Shots,
    link_in,
    mail_text,
    new_context,
    wait_for_mail,
)

pytestmark = pytest.mark.e2e


def sign_in(page, hub, smtp_server, email: str, first_time: bool = True):  # type: ignore[no-untyped-def]
    """Ask for a sign-in link on the start page and follow it."""
    before = len(smtp_server.messages)
    page.goto(hub.url + "/")
    page.get_by_label("Work email address").fill(email)
    page.get_by_role("button", name="Email me a sign-in link").click()
    link = link_in(wait_for_mail(smtp_server, before + 1))
    if first_time:
        sign_in_with_mail(page, smtp_server, link, before + 1)
    else:
        page.goto(link)
        page.get_by_role("button", name="Continue").click()
    page.wait_for_url("**/inbox")


def test_usage_counts_packages_and_bytes_per_facility_and_month(
    hub,
    mercy,
    lakeside,
    small_study,  # noqa: F811
):
    first = emix_json("send", str(small_study), "--to", "lakeside", env=mercy.env)
    second = emix_json("send", str(small_study), "--to", "lakeside", env=mercy.env)
    sizes = {p["id"]: p["size"] for p in emix_json("inbox", env=lakeside.env)["packages"]}
    assert set(sizes) == {first["package"], second["package"]}
    month = utcnow().strftime("%Y-%m")
    usage = emix_json("hub", "usage", "--month", month, "--home", str(hub.home))
    assert usage["month"] == month
    by_address = {f["address"]: f for f in usage["facilities"]}
    assert by_address["mercy"] == {
        "address": "mercy",
        "packages_sent": 2,
        "bytes_sent": sum(sizes.values()),
        "packages_received": 0,
        "bytes_received": 0,
    }
    assert by_address["lakeside"]["packages_received"] == 2
    assert by_address["lakeside"]["bytes_received"] == sum(sizes.values())
    assert by_address["lakeside"]["packages_sent"] == 0
    empty = emix_json("hub", "usage", "--month", "2001-02", "--home", str(hub.home))
    assert all(f["packages_sent"] == 0 for f in empty["facilities"])
    bad = emix("hub", "usage", "--month", "2026-13", "--home", str(hub.home), check=False)
    assert bad.returncode != 0 and "YYYY-MM" in bad.stderr


def test_admin_invites_a_member_who_reads_then_disables_them_and_searches_the_audit(
    hub,
    mercy,
    lakeside,
    small_study,  # noqa: F811
    smtp_server,
    browser,  # noqa: F811
):
    shots = Shots("admin")
    emix_json("send", str(small_study), "--to", "lakeside", env=mercy.env)
    wait_for_mail(smtp_server, 1)
    admin = new_context(browser).new_page()
    sign_in(admin, hub, smtp_server, "it@lakeside.example.org")
    admin.get_by_role("link", name="Administration").click()
    Authenticator().pass_step(admin)
    assert admin.locator("#packages-received").inner_text() == "1"
    shots(admin, "admin")

    admin.get_by_label("Work email address").fill("dr.jones@lakeside.example.org")
    admin.get_by_role("button", name="Send invitation").click()
    assert "Invitation sent" in admin.content()
    invitation = smtp_server.wait_for(4)[-1]
    assert invitation["To"] == "dr.jones@lakeside.example.org"
    assert (
        "dr.jones@lakeside.example.org" in admin.locator(".card", has_text="Pending").inner_text()
    )
    shots(admin, "admin-invited")

    jones_context = new_context(browser)
    jones = jones_context.new_page()
    sign_in_with_mail(jones, smtp_server, link_in(invitation), 4)
    jones.wait_for_url("**/inbox")
    assert "Mustermann, Erika" in jones.content()
    jones.locator("table.inbox a", has_text="Open").first.click()
    jones.wait_for_url("**/packages/*")
    # a member is not an administrator: the pages do not exist for them
    assert jones.goto(hub.url + "/admin").status == 404
    assert jones.goto(hub.url + "/admin/audit").status == 404

    admin.reload()
    row = admin.locator("tr", has_text="dr.jones@lakeside.example.org")
    assert "Active" in row.inner_text()
    row.get_by_role("button", name="Disable").click()
    assert "sessions ended" in admin.content()
    shots(admin, "admin-disabled")
    response = jones.goto(hub.url + "/inbox")
    assert response.status == 401 and "Mustermann" not in jones.content()

    admin.goto(hub.url + "/admin/audit?who=dr.jones")
    text = admin.locator("table.audit").inner_text()
    assert "instances-accessed" in text and "package page viewed" in text
    assert "user-authentication" in text
    shots(admin, "audit")


def test_administrator_enrols_an_authenticator_app_and_passes_it_at_every_sign_in(
    hub,
    mercy,
    lakeside,
    smtp_server,
    browser,  # noqa: F811
):
    """The mailed link alone opens the inbox, not the administration: the first visit
    enrols an authenticator app (QR code, key, recovery codes shown once), each later
    sign-in types a code from it, and a recovery code stands in for a lost phone once."""
    shots = Shots("second-factor")
    context = new_context(browser)
    page = context.new_page()
    sign_in(page, hub, smtp_server, "it@lakeside.example.org")
    page.get_by_role("link", name="Administration").click()
    page.wait_for_url("**/admin/2fa**")
    assert page.get_by_role("heading", name="Set up your authenticator app").is_visible()
    assert page.locator("figure.qr svg").is_visible()
    assert "otpauth://totp/" in page.locator("#totp-uri").text_content()
    shots(page, "enrol")
    page.get_by_label("6-digit code from the app").fill("12345")
    page.get_by_role("button", name="Turn on the second factor").click()
    assert page.get_by_role("alert").inner_text().startswith("That code is not right")
    assert "Members of lakeside" not in page.content()
    phone = Authenticator()
    phone.pass_step(page, shots)
    assert len(phone.recovery_codes) == 10
    own = page.locator("tr", has_text="it@lakeside.example.org")
    assert "Enrolled" in own.inner_text()
    shots(page, "admin-enrolled")
    page.get_by_role("button", name="Sign out").click()

    # the next sign-in (the same mailbox) needs the phone again
    sign_in(page, hub, smtp_server, "it@lakeside.example.org", first_time=False)
    page.goto(hub.url + "/admin/audit")
    page.wait_for_url("**/admin/2fa**")
    assert page.get_by_role("heading", name="Second factor").is_visible()
    assert page.locator("#totp-secret").count() == 0  # the key is never shown again
    phone.pass_step(page, shots)
    page.wait_for_url("**/admin/audit")
    assert "administrator's second factor passed" in page.locator("table.audit").inner_text()

    # a lost phone: a recovery code, once
    other = new_context(browser).new_page()
    sign_in(other, hub, smtp_server, "it@lakeside.example.org", first_time=False)
    other.goto(hub.url + "/admin")
    field = other.get_by_label("Code from your authenticator app, or a recovery code")
    field.fill(phone.recovery_codes[0])
    other.get_by_role("button", name="Verify").click()
    other.wait_for_url("**/admin?done=recovery*")
    assert "9 left" in other.content()
    shots(other, "recovery-code-used")
    assert context.outside == []


def test_patient_sees_and_downloads_the_shared_study_only_with_the_code(
    hub,
    mercy,
    lakeside,
    small_study,  # noqa: F811
    smtp_server,
    browser,  # noqa: F811
    tmp_path,
):
    shots = Shots("patient")
    package = emix_json("send", str(small_study), "--to", "lakeside", env=mercy.env)["package"]
    wait_for_mail(smtp_server, 1)
    sender = new_context(browser).new_page()
    sign_in(sender, hub, smtp_server, "admin@mercy.example.org")
    sender.get_by_role("link", name="Share with patient").click()
    shots(sender, "share-form")
    sender.get_by_label("Patient's email address").fill("erika@example.net")
    sender.get_by_label("Available for (days)").fill("7")
    sender.get_by_role("button", name="Share and show the access code").click()
    code = sender.locator("#access-code").inner_text().strip()
    assert re.fullmatch(r"[A-Z2-9]{4}-[A-Z2-9]{4}-[A-Z2-9]{4}", code)
    shots(sender, "access-code")
    mail = smtp_server.wait_for(4)[-1]
    body = mail_text(mail)
    assert mail["To"] == "erika@example.net" and code not in body
    for phi in ("MUSTERMANN", PATIENT_ID, "ACC-99120", package):
        assert phi not in body
    link = re.search(r"https?://\S+/patient/\S+", body).group(0)

    context = new_context(browser, accept_downloads=True)
    patient = context.new_page()
    patient.goto(link)
    shots(patient, "patient-code")
    patient.get_by_label("Access code").fill("AAAA-BBBB-CCCC")
    patient.get_by_role("button", name="Open my images").click()
    assert "not right" in patient.content()
    patient.get_by_label("Access code").fill(code.lower().replace("-", " "))
    patient.get_by_role("button", name="Open my images").click()
    patient.wait_for_url("**/patient/study")
    assert "Mustermann, Erika" in patient.content()
    assert "No acute abnormality" not in patient.content()  # the study, not the package
    shots(patient, "patient-study")
    with patient.expect_download() as info:
        patient.get_by_role("link", name="Download my images (zip)").click()
    saved = tmp_path / "mine.zip"
    info.value.save_as(saved)
    with zipfile.ZipFile(saved) as archive:
        names = archive.namelist()
        assert len(names) == 24 and all(n.endswith(".dcm") for n in names)
        assert pydicom.dcmread(archive.open(names[0])).PatientID == PATIENT_ID

    # the patient's session opens nothing else
    cookies = {c["name"]: c["value"] for c in context.cookies()}
    for path in (f"/packages/{package}", "/inbox", f"/api/v1/packages/{package}/zip"):
        r = requests.get(hub.url + path, cookies=cookies)
        assert r.status_code == 401 and "Mustermann" not in r.text, path
    events = emix("audit", "export", "--home", str(hub.home)).stdout
    assert "patient downloaded the study" in events

    # wrong codes are throttled, even with the right one afterwards
    other = new_context(browser).new_page()
    other.goto(link)
    for _ in range(4):  # with the one wrong try above: five
        other.get_by_label("Access code").fill("AAAA-BBBB-CCCC")
        other.get_by_role("button", name="Open my images").click()
    other.get_by_label("Access code").fill(code)
    other.get_by_role("button", name="Open my images").click()
    assert "Too many wrong codes" in other.content()


def test_admin_names_the_pacs_and_a_member_pushes_the_package_into_it(
    hub,
    mercy,
    lakeside,
    small_study,  # noqa: F811
    smtp_server,
    browser,  # noqa: F811
    orthanc_factory,
):
    pacs = orthanc_factory("lakeside-pacs")
    package = emix_json("send", str(small_study), "--to", "lakeside", env=mercy.env)["package"]
    wait_for_mail(smtp_server, 1)
    page = new_context(browser).new_page()
    sign_in(page, hub, smtp_server, "it@lakeside.example.org")
    page.goto(f"{hub.url}/packages/{package}")
    assert page.get_by_role("button", name=re.compile("Send to my PACS")).count() == 0

    page.goto(hub.url + "/admin")
    Authenticator().pass_step(page)
    page.get_by_label("Name", exact=True).fill("Lakeside Orthanc")
    page.get_by_label("DICOMweb root URL").fill(pacs.url)
    page.get_by_role("button", name="Save").click()
    assert "PACS destination saved" in page.content()

    page.goto(f"{hub.url}/packages/{package}")
    page.get_by_role("button", name="Send to my PACS (Lakeside Orthanc)").click()
    page.get_by_role("heading", name="Sent to your PACS").wait_for(timeout=120_000)
    assert "All 24 images were stored in Lakeside Orthanc" in page.content()
    Shots("pacs")(page, "pushed")
    stored = pacs.sop_instance_uids()
    assert len(stored) == 24
    # byte for byte as sent
    sent = {
        pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p).PixelData
        for p in small_study.rglob("*.dcm")
    }
    assert stored == set(sent)
    events = emix("audit", "export", "--home", str(hub.home)).stdout
    assert "pushed to PACS Lakeside Orthanc: 24 stored, 0 failed" in events


def test_a_pacs_named_as_a_dicom_node_gets_the_package_by_c_store(
    hub,
    mercy,
    lakeside,
    small_study,  # noqa: F811
    smtp_server,
    browser,  # noqa: F811
    orthanc_factory,
):
    """ "Send to my PACS" into a PACS without DICOMweb: the dimse plugin's C-STORE
    (``emix_pacs_push``), every dataset stored as sent."""
    pacs = orthanc_factory("lakeside-dimse-pacs", dicom=True, aet="LAKE_PACS")
    package = emix_json("send", str(small_study), "--to", "lakeside", env=mercy.env)["package"]
    wait_for_mail(smtp_server, 1)
    page = new_context(browser).new_page()
    sign_in(page, hub, smtp_server, "it@lakeside.example.org")
    page.goto(hub.url + "/admin")
    Authenticator().pass_step(page)
    page.get_by_label("Name", exact=True).fill("Lakeside PACS")
    page.get_by_label("DICOM node (AET@HOST:PORT)").fill("not a node")
    page.get_by_role("button", name="Save").click()
    assert "DICOM node, e.g. ORTHANC@pacs.example.org:104" in page.content()
    page.goto(hub.url + "/admin")
    page.get_by_label("Name", exact=True).fill("Lakeside PACS")
    page.get_by_label("DICOM node (AET@HOST:PORT)").fill(pacs.dicom_address)
    page.get_by_role("button", name="Save").click()
    assert "PACS destination saved" in page.content()

    page.goto(f"{hub.url}/packages/{package}")
    page.get_by_role("button", name="Send to my PACS (Lakeside PACS)").click()
    page.get_by_role("heading", name="Sent to your PACS").wait_for(timeout=120_000)
    assert "All 24 images were stored in Lakeside PACS" in page.content()
    Shots("pacs")(page, "pushed-dimse")
    sent = {
        pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p).PixelData
        for p in small_study.rglob("*.dcm")
    }
    assert pacs.sop_instance_uids() == set(sent)
    events = emix("audit", "export", "--home", str(hub.home)).stdout
    assert "pushed to PACS Lakeside PACS: 24 stored, 0 failed" in events

    # the PACS goes away: the member is told, nothing claims success
    pacs.stop()
    page.goto(f"{hub.url}/packages/{package}")
    page.get_by_role("button", name="Send to my PACS (Lakeside PACS)").click()
    page.get_by_role("heading", name="Not everything was sent").wait_for(timeout=120_000)
    assert "0 images were stored in Lakeside PACS" in page.content()
