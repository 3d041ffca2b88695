"""SMART on FHIR launch, in process: the hub as a Flask app, the EHR simulator on a loopback
port. Every refusal a hostile or broken launch must meet has its test here."""

from __future__ import annotations

import base64
import hashlib
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlencode

import pytest
import requests
from conftest import CLIENT_ID, SECRET, Launch, configure
from ehr_simulator import Client

from emix_core import PluginRecords, generate_study, send_paths
from emix_core.testing import PATIENT_ID, PATIENT_NAME, write_study_with_report


@pytest.fixture
def smart_hub(hub_app, ehr):  # type: ignore[no-untyped-def]
    configure(hub_app.home, ehr)
    return hub_app


def launch_of(hub, ehr) -> Launch:  # type: ignore[no-untyped-def]
    return Launch(hub.app.test_client(), ehr)


def refused(answer, words: str) -> None:  # type: ignore[no-untyped-def]
    body = answer.get_data(as_text=True)
    assert answer.status_code == 403, body
    assert "emix could not open from the EMR" in body and words in body, body
    assert "emix_session" not in answer.headers.get("Set-Cookie", "")


# --------------------------------------------------------------------------- the happy path


def test_ehr_launch_signs_the_member_in_and_shows_the_patient_from_the_emr(smart_hub, ehr):
    launch = launch_of(smart_hub, ehr)
    answer = launch.ehr_launch()
    assert answer.status_code == 303 and answer.headers["Location"] == "/smart/"
    cookies = answer.headers.getlist("Set-Cookie")
    assert any(c.startswith("emix_session=") for c in cookies)
    assert any(c.startswith("emix_smart=") and "HttpOnly" in c for c in cookies)

    # the authorization request: PKCE S256, state, aud = the FHIR server, v2 scopes, launch
    p = launch.params
    assert p["code_challenge_method"] == "S256" and len(p["code_challenge"]) == 43
    assert p["aud"] == ehr.fhir_base and p["client_id"] == CLIENT_ID
    assert p["scope"] == "launch openid fhirUser patient/*.rs" and p["launch"]
    assert len(p["state"]) >= 43 and p["nonce"]
    verifier = ehr.token_requests[0]["code_verifier"]
    digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=")
    assert digest.decode() == p["code_challenge"]

    page = launch.client.get("/smart/")
    html = page.get_data(as_text=True)
    assert page.status_code == 200, html
    assert "Mustermann, Erika" in html and "1964-08-12" in html
    assert "CT chest outside study" in html and "CT chest report" in html
    assert "No acute findings." in html
    assert "it@lakeside.example.org" in html  # signed in as the member, no second login
    csp = page.headers["Content-Security-Policy"]
    assert f"frame-ancestors {ehr.base}" in csp and "X-Frame-Options" not in page.headers
    # the tokens stay on the hub: not in the page, not in a cookie
    token = next(iter(ehr.tokens))
    assert token not in html and all(token not in c for c in cookies)
    # the member's other pages work with the session the launch opened
    assert launch.client.get("/inbox").status_code == 200


def test_received_studies_of_the_patient_are_listed_with_open_in_viewer(
    hub_server, ehr, tmp_path: Path
):
    configure(hub_server.home, ehr)
    study = tmp_path / "study"
    generate_study(study, slices=2, series=1, patient_name=PATIENT_NAME, patient_id=PATIENT_ID)
    other = tmp_path / "other"
    generate_study(other, slices=1, series=1, patient_name="DOE^JOHN", patient_id="PID-9999")
    home, client = hub_server.facility_home(tmp_path, "mercy")
    sent = send_paths([study], ["lakeside"], client=client, home=home)
    send_paths([other], ["lakeside"], client=client, home=home)

    launch = launch_of(hub_server, ehr)
    assert launch.ehr_launch().status_code == 303
    html = launch.client.get("/smart/").get_data(as_text=True)
    assert f"/packages/{sent.package_id}" in html  # the patient's package, from mercy
    assert html.count('href="/packages/') == 1  # and not the other patient's
    assert "mercy" in html
    assert "Open in viewer" not in html  # the viewer is not installed on this hub

    # with the viewer: a single-use link opens the study in a new tab, signed in there
    (hub_server.home / "viewer" / "dist").mkdir(parents=True)
    (hub_server.home / "viewer" / "dist" / "index.html").write_text("<html></html>")
    html = launch.client.get("/smart/").get_data(as_text=True)
    link = html.split('href="/smart/open/')[1].split('"')[0]
    tab = hub_server.app.test_client()  # a new tab: none of the iframe's cookies
    opened = tab.get(f"/smart/open/{link}")
    assert opened.status_code == 303 and opened.headers["Location"].startswith("/viewer/")
    assert "StudyInstanceUIDs=" in opened.headers["Location"]
    assert "emix_session=" in opened.headers["Set-Cookie"]
    assert tab.get("/smart/open/" + link).status_code == 404  # once only


def test_a_received_report_is_saved_to_the_chart_as_a_document_reference(
    hub_server, ehr, tmp_path: Path
):
    configure(hub_server.home, ehr, write_back=True)
    study = write_study_with_report(tmp_path / "study", slices=2, series=1)
    home, client = hub_server.facility_home(tmp_path, "mercy")
    sent = send_paths([study], ["lakeside"], client=client, home=home)

    launch = launch_of(hub_server, ehr)
    launch.ehr_launch()
    assert "patient/DocumentReference.c" in launch.params["scope"].split()
    html = launch.client.get("/smart/").get_data(as_text=True)
    assert "Save report to the chart" in html
    action = html.split('action="/smart/reports/')[1].split('"')[0]
    form = html.split('action="/smart/reports/')[1]
    csrf = form.split('name="csrf" value="')[1].split('"')[0]
    assert action.startswith(f"{sent.package_id}/")

    # without the form's token: refused, nothing written
    refused(launch.client.post(f"/smart/reports/{action}", data={}), "form expired")
    assert ehr.resources["DocumentReference"] == {}

    saved = launch.client.post(f"/smart/reports/{action}", data={"csrf": csrf})
    assert saved.status_code == 201, saved.get_data(as_text=True)
    (document,) = ehr.resources["DocumentReference"].values()
    assert document["subject"]["reference"] == "Patient/pat-1"
    assert document["type"]["coding"][0]["code"] == "18748-4"
    attachment = document["content"][0]["attachment"]
    pdf = (study / "report.pdf").read_bytes()
    assert attachment["contentType"] == "application/pdf"
    assert base64.b64decode(attachment["data"]) == pdf
    related = document["context"]["related"][0]["identifier"]["value"]
    assert related.startswith("urn:oid:1") or related.startswith("urn:oid:2")


def test_refresh_renews_an_expired_access_token_on_the_hub(smart_hub, ehr):
    ehr.access_ttl = 5  # below the refresh margin: every page view refreshes
    launch = launch_of(smart_hub, ehr)
    launch.ehr_launch()
    assert launch.client.get("/smart/").status_code == 200
    grants = [r["grant_type"] for r in ehr.token_requests]
    assert grants == ["authorization_code", "refresh_token"]
    assert launch.client.get("/smart/").status_code == 200  # the rotated refresh token works
    assert [r["grant_type"] for r in ehr.token_requests][-1] == "refresh_token"


def test_smart_v1_server_gets_v1_scopes(smart_hub, ehr):
    ehr.capabilities = [c for c in ehr.capabilities if c != "permission-v2"]
    launch = launch_of(smart_hub, ehr)
    launch.start(urlencode({"iss": ehr.fhir_base, "launch": ehr.new_launch()}))
    assert launch.params["scope"] == "launch openid fhirUser patient/*.read"


def test_public_client_sends_no_secret_and_relies_on_pkce(hub_app, ehr):
    ehr.register(Client("emix-public", "http://127.0.0.1:8480/smart/callback", auth_method="none"))
    configure(hub_app.home, ehr, client_id="emix-public", client_secret="", token_auth="none")
    launch = launch_of(hub_app, ehr)
    assert launch.ehr_launch().status_code == 303
    request = ehr.token_requests[0]
    assert request["client_id"] == "emix-public" and "client_secret" not in request


def test_confidential_client_with_private_key_jwt(hub_app, ehr, tmp_path: Path):
    from joserfc.jwk import RSAKey

    key = RSAKey.generate_key(2048, parameters={"kid": "emix-1"})
    pem = tmp_path / "smart-client.pem"
    pem.write_bytes(key.as_pem(private=True))
    ehr.register(
        Client(
            "emix-jwt",
            "http://127.0.0.1:8480/smart/callback",
            auth_method="private_key_jwt",
            public_jwk=key.as_dict(private=False),
        )
    )
    configure(
        hub_app.home,
        ehr,
        client_id="emix-jwt",
        client_secret="",
        token_auth="private_key_jwt",
        private_key_file=str(pem),
        private_key_id="emix-1",
    )
    launch = launch_of(hub_app, ehr)
    answer = launch.ehr_launch()
    assert answer.status_code == 303, answer.get_data(as_text=True)
    request = ehr.token_requests[0]
    assert request["client_assertion_type"].endswith("jwt-bearer")
    header = request["client_assertion"].split(".")[0]
    assert b'"RS384"' in base64.urlsafe_b64decode(header + "==")


def test_standalone_launch_uses_the_emr_patient_picker(smart_hub, ehr):
    launch = launch_of(smart_hub, ehr)
    assert launch.start("").status_code == 302
    assert "launch" not in launch.params and "launch/patient" in launch.params["scope"]
    picker = requests.get(launch.authorize_url, timeout=10)
    assert "Choose a patient" in picker.text and "Mustermann" in picker.text
    launch.authorize_url += "&picked_patient=pat-1"
    launch.authorize()
    assert launch.callback().status_code == 303
    assert "Mustermann, Erika" in launch.client.get("/smart/").get_data(as_text=True)


def test_a_clinician_who_is_not_a_verified_member_gets_a_clear_page(smart_hub, ehr):
    ehr.resources["Practitioner"]["dr-lake"]["telecom"][0]["value"] = "stranger@elsewhere.org"
    answer = launch_of(smart_hub, ehr).ehr_launch()
    html = answer.get_data(as_text=True)
    assert answer.status_code == 403 and "You are not an emix member yet" in html
    assert "administrator" in html
    assert "emix_session" not in answer.headers.get("Set-Cookie", "")


def test_the_page_needs_a_launch(smart_hub):
    answer = smart_hub.client.get("/smart/")
    refused(answer, "open emix from a patient")


# --------------------------------------------------------------------------- refused


def test_issuer_not_on_the_allowlist_is_refused_before_anything_is_fetched(smart_hub, ehr):
    launch = launch_of(smart_hub, ehr)
    answer = launch.start(urlencode({"iss": "https://evil.example.org/fhir", "launch": "x"}))
    refused(answer, "not on this hub")
    assert ehr.authorize_requests == []


def test_missing_state_is_refused(smart_hub, ehr):
    launch = launch_of(smart_hub, ehr)
    launch.start(urlencode({"iss": ehr.fhir_base, "launch": ehr.new_launch()}))
    url = launch.authorize()
    refused(launch.callback(url.replace("state=", "nostate=")), "no state")


def test_replayed_state_is_refused(smart_hub, ehr):
    launch = launch_of(smart_hub, ehr)
    assert launch.ehr_launch().status_code == 303
    refused(launch.callback(), "already used")


def test_wrong_code_verifier_is_refused_by_the_emr(smart_hub, ehr):
    launch = launch_of(smart_hub, ehr)
    launch.start(urlencode({"iss": ehr.fhir_base, "launch": ehr.new_launch()}))
    state = launch.params["state"]
    with smart_hub.app.test_request_context():  # the verifier kept on the hub is changed
        records = PluginRecords("smart-launch")
        transaction = records.take(f"tx:{state}")
        transaction["verifier"] = "x" * 64
        records.put(f"tx:{state}", transaction, timedelta(minutes=5))
    launch.authorize()
    refused(launch.callback(), "did not exchange the sign-in code (invalid_grant)")


def test_a_code_swapped_from_another_session_is_refused(smart_hub, ehr):
    victim = launch_of(smart_hub, ehr)
    attacker = launch_of(smart_hub, ehr)
    victim.start(urlencode({"iss": ehr.fhir_base, "launch": ehr.new_launch()}))
    attacker.start(urlencode({"iss": ehr.fhir_base, "launch": ehr.new_launch()}))
    victim_url = victim.authorize()
    attacker_url = attacker.authorize()
    # the attacker's code with the victim's own state: its PKCE challenge is not the victim's
    code = attacker_url.split("code=")[1].split("&")[0]
    swapped = victim_url.replace(victim_url.split("code=")[1].split("&")[0], code)
    refused(victim.callback(swapped), "invalid_grant")
    # the attacker's whole answer (code and state) in the victim's browser: another browser
    victim2 = launch_of(smart_hub, ehr)
    victim2.start(urlencode({"iss": ehr.fhir_base, "launch": ehr.new_launch()}))
    refused(victim2.callback(attacker_url), "another browser")


@pytest.mark.parametrize(
    ("mode", "words"),
    [
        ("wrong_aud", "id_token was refused: invalid_claim"),
        ("bad_signature", "did not verify against its key set"),
        ("expired", "id_token was refused: expired_token"),
    ],
)
def test_an_id_token_that_does_not_verify_is_refused(smart_hub, ehr, mode, words):
    ehr.id_token_mode = mode
    refused(launch_of(smart_hub, ehr).ehr_launch(), words)


def test_a_token_without_patient_context_is_refused(smart_hub, ehr):
    ehr.omit_patient = True
    refused(launch_of(smart_hub, ehr).ehr_launch(), "no patient context")


def test_launch_without_configuration_says_what_to_set(hub_app, ehr):
    answer = hub_app.client.get(f"/smart/launch?iss={ehr.fhir_base}&launch=x")
    assert answer.status_code == 403
    assert "allowed_issuers" in answer.get_data(as_text=True)


def test_refused_launches_are_audited(smart_hub, ehr):
    launch = launch_of(smart_hub, ehr)
    launch.start(urlencode({"iss": "https://evil.example.org/fhir", "launch": "x"}))
    events = smart_hub.hub.audit_log.events(limit=None)
    refusals = [e for e in events if "SMART launch refused" in (e.get("detail") or "")]
    assert refusals and "not on this hub" in refusals[-1]["detail"]


def test_secret_is_never_sent_to_an_unlisted_server(smart_hub, ehr):
    launch = launch_of(smart_hub, ehr)
    launch.start(urlencode({"iss": ehr.fhir_base + "x", "launch": "x"}))
    assert all(SECRET not in str(r) for r in ehr.token_requests)


# --------------------------------------------------------------------------- hostile answers


def test_an_allowed_issuer_without_smart_configuration_is_refused_clearly(hub_app, ehr):
    configure(hub_app.home, ehr, allowed_issuers=[f"{ehr.base}/chart"])
    launch = launch_of(hub_app, ehr)
    answer = launch.start(urlencode({"iss": f"{ehr.base}/chart", "launch": "x"}))
    refused(answer, "SMART configuration answered HTTP 404")


def test_a_fhir_user_on_another_server_is_not_followed(smart_hub, ehr):
    ehr.fhir_user_base = "http://127.0.0.1:9/fhir"  # a claim naming another server
    refused(launch_of(smart_hub, ehr).ehr_launch(), "named a resource on another server")


def test_a_patient_context_that_is_not_a_fhir_id_is_refused(smart_hub, ehr):
    launch = launch_of(smart_hub, ehr)
    launch.start(urlencode({"iss": ehr.fhir_base, "launch": ehr.new_launch("../Practitioner/x")}))
    launch.authorize()
    refused(launch.callback(), "not a FHIR resource id")
    refused(launch.client.get("/smart/study/x%3Cscript%3E"), "not a FHIR resource id")


def test_hostile_launch_parameters_are_cut_and_refused(smart_hub, ehr):
    launch = launch_of(smart_hub, ehr)
    answer = launch.start(urlencode({"iss": "javascript:alert(1)", "launch": "x" * 100000}))
    refused(answer, "not on this hub")
    answer = launch.start(urlencode({"launch": "x"}))  # a launch without its iss
    refused(answer, "without its FHIR server")
