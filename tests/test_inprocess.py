"""The exchange on an in-process hub: the same code paths as the e2e tests, no process.

These run in the fast loop (`pytest -m "not e2e"`); the e2e tests repeat the essentials
against a gunicorn-served hub in its own process.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from emix_core import generate_study, receive_package, send_paths
from emix_core.testing import HubApp, HubServer


def _digests(paths: list[Path]) -> set[str]:
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def test_no_token_or_a_wrong_one_is_401_and_says_nothing_more(hub_app: HubApp) -> None:
    client = hub_app.client
    for headers in ({}, {"Authorization": "Bearer emx_not-a-real-token"}):
        answer = client.get("/api/v1/inbox", headers=headers)
        assert answer.status_code == 401
        assert "mercy" not in answer.get_data(as_text=True)


def test_a_package_of_another_facility_is_404_never_403(hub_app: HubApp) -> None:
    client = hub_app.client
    created = client.post(
        "/api/v1/packages", json={"to": ["lakeside"]}, headers=hub_app.headers("mercy")
    )
    assert created.status_code == 201, created.get_data(as_text=True)
    package = created.get_json()["id"]
    own = client.get(f"/api/v1/packages/{package}", headers=hub_app.headers("mercy"))
    assert own.status_code == 200 and own.get_json()["state"] == "open"
    hub_app.add_facility("Elsewhere Clinic", "it@elsewhere.example.org", "elsewhere")
    answer = client.get(f"/api/v1/packages/{package}", headers=hub_app.headers("elsewhere"))
    assert answer.status_code == 404
    missing = client.get(f"/api/v1/packages/{'0' * 32}", headers=hub_app.headers("elsewhere"))
    assert missing.status_code == 404
    assert answer.get_json() == missing.get_json()


def test_a_study_crosses_an_in_process_hub_verified_end_to_end(
    hub_server: HubServer, tmp_path: Path, smtp_server
) -> None:
    study = tmp_path / "study"
    files = generate_study(study, slices=8, series=2, rows=64, columns=64)
    mercy, mercy_client = hub_server.facility_home(tmp_path, "mercy")
    lakeside, lakeside_client = hub_server.facility_home(tmp_path, "lakeside")

    sent = send_paths([study], ["lakeside"], client=mercy_client, home=mercy)
    assert sent.package_id and not sent.failed
    mails = smtp_server.wait_for(1)
    assert [m["To"] for m in mails] == ["it@lakeside.example.org"]

    listing = lakeside_client.inbox()
    assert [p["id"] for p in listing] == [sent.package_id]
    received = receive_package(
        sent.package_id, tmp_path / "in", client=lakeside_client, home=lakeside
    )
    written = sorted((received.path / "DICOM").rglob("*.dcm"))
    assert _digests(written) == _digests(files)
    # both sides recorded it in their own chains, and both chains verify
    assert mercy.audit_log.verify().ok and lakeside.audit_log.verify().ok
    assert hub_server.hub.audit_log.verify().ok
