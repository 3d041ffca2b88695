""" "Share with…" from the EMR: the hub keeps the request for the facility; the facility's
side takes it and sends the study from its PACS (``emix dicomweb send``)."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlencode

import pydicom
import pyotp
import pytest
import requests
from conftest import CLIENT_ID, SECRET, Launch, configure
from ehr_simulator import Client

from emix_core import generate_study
from emix_core.testing import PATIENT_ID, PATIENT_NAME, emix, emix_json, free_port

UID = "1.2.826.0.1.3680043.8.498.11223344556677"


def share_form(html: str) -> tuple[str, str]:
    action = html.split('action="/smart/share/')[1].split('"')[0]
    form = html.split('action="/smart/share/')[1]
    return action, form.split('name="csrf" value="')[1].split('"')[0]


@pytest.fixture
def launched(hub_app, ehr):  # type: ignore[no-untyped-def]
    configure(hub_app.home, ehr)
    ehr.resources["ImagingStudy"]["img-1"]["identifier"][0]["value"] = f"urn:oid:{UID}"
    launch = Launch(hub_app.app.test_client(), ehr)
    launch.ehr_launch()
    return hub_app, launch


def test_a_share_request_waits_for_the_facility_and_is_handed_over_once(launched):
    hub_app, launch = launched
    html = launch.client.get("/smart/").get_data(as_text=True)
    action, csrf = share_form(html)
    assert action == "img-1"
    answer = launch.client.post("/smart/share/img-1", data={"csrf": csrf, "to": "mercy"})
    assert answer.status_code == 202 and "Sharing with mercy" in answer.get_data(as_text=True)

    assert hub_app.client.get("/api/v1/smart/shares", headers=hub_app.headers("mercy")).json == {
        "shares": []
    }  # another facility sees nothing
    again = launch.client.post("/smart/share/img-1", data={"csrf": csrf, "to": "mercy"})
    assert again.status_code == 202  # a second request is kept beside the first
    taken = hub_app.client.get("/api/v1/smart/shares", headers=hub_app.headers("lakeside")).json
    share, second = taken["shares"]
    assert share["id"] != second["id"]
    assert share["study_uid"] == UID and share["to"] == "mercy"
    assert share["requested_by"] == "it@lakeside.example.org"
    again = hub_app.client.get("/api/v1/smart/shares", headers=hub_app.headers("lakeside"))
    assert again.json == {"shares": []}
    assert hub_app.client.get("/api/v1/smart/shares").status_code == 401


@pytest.mark.parametrize(
    ("form", "words"),
    [
        ({"to": "mercy"}, "form expired"),
        ({"to": "lakeside"}, "name another facility"),
        ({"to": "../mercy"}, "name another facility"),
    ],
)
def test_a_bad_share_request_is_refused_and_nothing_waits(launched, form, words):
    hub_app, launch = launched
    _, csrf = share_form(launch.client.get("/smart/").get_data(as_text=True))
    data = {**form, "csrf": csrf} if "expired" not in words else form
    answer = launch.client.post("/smart/share/img-1", data=data)
    assert answer.status_code == 403 and words in answer.get_data(as_text=True)
    taken = hub_app.client.get("/api/v1/smart/shares", headers=hub_app.headers("lakeside"))
    assert taken.json == {"shares": []}


@pytest.mark.e2e
def test_shared_from_the_chart_the_study_goes_from_the_pacs_to_the_other_facility(
    hub, mercy, lakeside, ehr, orthanc_factory, tmp_path: Path
):
    pacs = orthanc_factory("lakeside-pacs")
    files = generate_study(
        tmp_path / "ct", slices=4, series=1, patient_name=PATIENT_NAME, patient_id=PATIENT_ID
    )
    for path in files:
        pacs.upload(path)
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    ehr.resources["ImagingStudy"]["img-1"]["identifier"][0]["value"] = f"urn:oid:{uid}"
    ehr.register(Client(CLIENT_ID, f"{hub.url}/smart/callback", secret=SECRET))
    configure(hub.home, ehr)

    browser = requests.Session()  # the clinician's browser, through the real redirects
    query = urlencode({"iss": ehr.fhir_base, "launch": ehr.new_launch()})
    page = browser.get(f"{hub.url}/smart/launch?{query}", timeout=30)
    assert page.status_code == 200 and "Mustermann, Erika" in page.text
    # inside the EMR's frame, the hub's own pages (which refuse to be framed) open in a tab
    assert '<a href="/inbox" target="_blank" rel="noopener"' in page.text
    assert 'action="/logout" class="inline" target="_blank"' in page.text
    action, csrf = share_form(page.text)
    shared = browser.post(
        f"{hub.url}/smart/share/{action}", data={"csrf": csrf, "to": "mercy"}, timeout=30
    )
    assert shared.status_code == 202, shared.text

    # the facility's side first runs with a wrong PACS URL: the request is kept, not lost
    dead = f"http://127.0.0.1:{free_port()}/dicom-web"
    failing = emix("smart", "shares", "--pacs", dead, "--json", env=lakeside.env, check=False)
    assert failing.returncode == 1
    (first,) = json.loads(failing.stdout)["shares"]
    assert first["sent"] is False and first["retry"] is True

    done = emix_json("smart", "shares", "--pacs", pacs.url, env=lakeside.env)
    (result,) = done["shares"]
    assert result["sent"] is True and result["to"] == "mercy" and result["id"] == first["id"]
    inbox = emix_json("inbox", "--json", env=mercy.env)["packages"]
    (received,) = [p for p in inbox if p["from"] == "lakeside"]
    assert [s["study_uid"] for s in received["studies"]] == [uid]  # as the PACS had it
    assert received["items"] == 4
    again = emix("smart", "shares", "--pacs", pacs.url, env=lakeside.env)
    assert "no share request is waiting" in again.stdout


def test_a_link_opened_in_the_administrators_browser_does_not_take_the_share_requests(launched):
    """The requests are taken with the facility's token only. A GET with the browser's
    session cookie (any site can send the administrator's browser to the URL) would hand
    them to the browser and take them from the queue: the studies would never be sent."""
    hub_app, launch = launched
    html = launch.client.get("/smart/").get_data(as_text=True)
    action, csrf = share_form(html)
    assert launch.client.post(f"/smart/share/{action}", data={"csrf": csrf, "to": "mercy"})
    # the EMR signed in lakeside's administrator, who sets up the second factor too
    step = launch.client.get("/admin/2fa").get_data(as_text=True)
    secret = step.split('id="totp-secret">')[1].split("<")[0].replace(" ", "")
    form_csrf = step.split('name="csrf" value="')[1].split('"')[0]
    enrolled = launch.client.post(
        "/admin/2fa/enrol", data={"csrf": form_csrf, "code": pyotp.TOTP(secret).now()}
    )
    assert enrolled.status_code == 200
    assert launch.client.get("/api/v1/members").status_code == 200  # the cookie is an admin's
    followed = launch.client.get("/api/v1/smart/shares")
    assert followed.status_code == 404 and "study_uid" not in followed.get_data(as_text=True)
    taken = hub_app.client.get("/api/v1/smart/shares", headers=hub_app.headers("lakeside")).json
    assert [s["study_uid"] for s in taken["shares"]] == [UID]
