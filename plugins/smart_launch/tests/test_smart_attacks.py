"""Attacks on the SMART launch that the first round of tests did not try: a sending facility
whose studies carry the EMR patient's identifier for another person, and framing origins
that would let any site frame the patient's page."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Launch, configure

from emix_core import generate_study, send_paths
from emix_core.testing import PATIENT_ID, PATIENT_NAME


def _listed(hub, ehr, tmp_path: Path, **study) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """Mercy sends a study to lakeside; the package id and lakeside's SMART page."""
    configure(hub.home, ehr)
    folder = tmp_path / "study"
    generate_study(folder, slices=1, series=1, **study)
    home, client = hub.facility_home(tmp_path, "mercy")
    sent = send_paths([folder], ["lakeside"], client=client, home=home)
    launch = Launch(hub.app.test_client(), ehr)
    assert launch.ehr_launch().status_code == 303
    return sent.package_id, launch.client.get("/smart/").get_data(as_text=True)


def test_another_person_with_the_same_patient_id_is_not_listed_under_the_emr_patient(
    hub_server, ehr, tmp_path: Path
):
    # MRNs are only unique inside one facility: mercy's PID-7734-XQ is someone else
    package, html = _listed(
        hub_server, ehr, tmp_path, patient_name="DOE^JOHN", patient_id=PATIENT_ID
    )
    assert "Mustermann, Erika" in html
    assert f"/packages/{package}" not in html


def test_a_study_with_the_patient_id_and_no_name_is_not_listed(hub_server, ehr, tmp_path: Path):
    package, html = _listed(hub_server, ehr, tmp_path, patient_name="", patient_id=PATIENT_ID)
    assert f"/packages/{package}" not in html


def test_the_patient_is_matched_by_id_and_family_name_whatever_the_case(
    hub_server, ehr, tmp_path: Path
):
    package, html = _listed(
        hub_server, ehr, tmp_path, patient_name=PATIENT_NAME.lower(), patient_id=PATIENT_ID
    )
    assert f"/packages/{package}" in html


@pytest.mark.parametrize(
    "origin",
    [
        "https://*",
        "https://*.example.org",
        "https://emr.example.org *",
        "https://emr.example.org https://attacker.example",
        "https://emr.example.org;script-src",
        "https://user@emr.example.org",
    ],
)
def test_a_framing_origin_that_lets_other_sites_frame_the_page_is_refused(
    hub_app, ehr, origin: str
):
    configure(hub_app.home, ehr, frame_ancestors=[origin])
    page = hub_app.app.test_client().get("/smart/launch")
    assert page.headers["Content-Security-Policy"].endswith("frame-ancestors 'none'")
    assert "frame_ancestors takes origins like" in page.get_data(as_text=True)


def test_an_emr_cannot_sign_in_a_member_of_a_facility_it_does_not_serve(hub_app, ehr):
    # lakeside's EMR is trusted for lakeside; it claims its user is mercy's admin
    configure(hub_app.home, ehr, issuer_facilities={ehr.fhir_base: ["lakeside"]})
    (practitioner,) = ehr.resources["Practitioner"].values()
    practitioner["telecom"] = [{"system": "email", "value": "admin@mercy.example.org"}]
    launch = Launch(hub_app.app.test_client(), ehr)
    answer = launch.ehr_launch()
    body = answer.get_data(as_text=True)
    assert answer.status_code == 403, body
    assert "not one this EMR may sign in" in body
    assert "emix_session" not in answer.headers.get("Set-Cookie", "")
    assert launch.client.get("/inbox").status_code != 200


def test_an_emr_without_facilities_signs_no_one_in(hub_app, ehr):
    configure(hub_app.home, ehr, issuer_facilities={})
    answer = Launch(hub_app.app.test_client(), ehr).ehr_launch()
    assert answer.status_code == 403
    assert "issuer_facilities" in answer.get_data(as_text=True)


@pytest.mark.parametrize("uid", ["*", "1.2.3*", "1.2.3\\4.5.6", "1.2.840.10008?x=1"])
def test_a_share_of_an_emr_study_whose_uid_is_a_wildcard_or_list_is_refused(hub_app, ehr, uid):
    # the facility's side would ask its PACS for this "UID": a wildcard is the whole PACS
    configure(hub_app.home, ehr)
    ehr.resources["ImagingStudy"]["img-1"]["identifier"][0]["value"] = f"urn:oid:{uid}"
    launch = Launch(hub_app.app.test_client(), ehr)
    launch.ehr_launch()
    html = launch.client.get("/smart/").get_data(as_text=True)
    csrf = html.split('action="/smart/share/')[1].split('name="csrf" value="')[1].split('"')[0]
    answer = launch.client.post("/smart/share/img-1", data={"csrf": csrf, "to": "mercy"})
    assert answer.status_code == 403
    assert "not a DICOM Study Instance UID" in answer.get_data(as_text=True)
    taken = hub_app.client.get("/api/v1/smart/shares", headers=hub_app.headers("lakeside"))
    assert taken.json == {"shares": []}
