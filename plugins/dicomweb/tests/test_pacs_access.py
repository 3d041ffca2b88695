"""Reaching a PACS safely: TLS verification, client certificates, tokens, redirects, URLs."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from emix_dicomweb.connection import PacsConnection, PacsError, PacsSettings
from emix_dicomweb.query import find_studies
from emix_dicomweb.retrieve import Retrieval, retrieve_all
from emix_dicomweb.store import InstanceToStore, store_instances

from emix_core import ConfigError
from emix_core.testing import FrontDoor, Orthanc, make_certificates, needs_orthanc

pytestmark = needs_orthanc


@pytest.fixture(scope="module")
def pacs(orthanc_factory, tmp_path_factory) -> tuple[Orthanc, pydicom.Dataset, Path]:
    from pydicom.data import get_testdata_file

    pacs = orthanc_factory("access")
    path = Path(get_testdata_file("JPEG2000.dcm"))
    pacs.upload(path)
    return pacs, pydicom.dcmread(path, stop_before_pixels=True), path


def test_tls_is_verified_and_a_client_certificate_opens_the_door(pacs, tmp_path: Path):
    orthanc, ds, original = pacs
    certs = make_certificates(tmp_path / "certs")
    with FrontDoor(orthanc, certificates=certs, client_certificate=True) as door:
        untrusted = PacsConnection(PacsSettings(door.url))  # verification on by default
        with pytest.raises(PacsError, match="TLS handshake"):
            find_studies(untrusted, {"StudyInstanceUID": ds.StudyInstanceUID})
        anonymous = PacsConnection(PacsSettings(door.url, tls_verify=str(certs.ca)))
        with pytest.raises(PacsError):
            find_studies(anonymous, {"StudyInstanceUID": ds.StudyInstanceUID})
        gateway = PacsConnection(
            PacsSettings(
                door.url,
                auth="cert",
                cert=str(certs.client_cert),
                key=str(certs.client_key),
                tls_verify=str(certs.ca),
            )
        )
        [study] = find_studies(gateway, {"StudyInstanceUID": ds.StudyInstanceUID})
        result = retrieve_all(gateway, [Retrieval(study.study_uid)], tmp_path / "out")
    assert [p.read_bytes() for p in result.files] == [original.read_bytes()]


def test_a_redirect_to_another_host_is_refused(pacs):
    orthanc, ds, _ = pacs
    elsewhere = f"http://localhost:{orthanc.port}"  # same machine, another host name
    with FrontDoor(orthanc, redirect_to=elsewhere) as door:
        conn = PacsConnection(PacsSettings(door.url))
        with pytest.raises(PacsError, match="redirect to another host"):
            find_studies(conn, {"StudyInstanceUID": ds.StudyInstanceUID})
    assert door.log and door.log[0][2] == 302


def test_a_bearer_token_is_sent_and_a_missing_one_is_explained(pacs):
    orthanc, ds, _ = pacs
    with FrontDoor(orthanc, token="tok-123") as door:
        with pytest.raises(PacsError, match="HTTP 401.*credentials"):
            find_studies(PacsConnection(PacsSettings(door.url)), {})
        conn = PacsConnection(PacsSettings(door.url, token="tok-123"))
        assert conn.auth == "bearer"
        found = find_studies(conn, {"StudyInstanceUID": ds.StudyInstanceUID})
    assert [s.study_uid for s in found] == [ds.StudyInstanceUID]


def test_a_receive_only_endpoint_gets_the_instances_unverified(pacs, orthanc_factory):
    _, ds, original = pacs
    target = orthanc_factory("receive-only")
    with FrontDoor(target, stow_only=True) as door:
        report = store_instances(
            PacsConnection(PacsSettings(door.url)),
            [InstanceToStore(original, ds.SOPInstanceUID, ds.StudyInstanceUID, 1)],
        )
    assert report.summary()["stored"] == 1 and not report.verified
    assert target.sop_instance_uids() == {ds.SOPInstanceUID}


@pytest.mark.parametrize(
    "url, message",
    [
        ("ftp://pacs.example.org/dicom-web", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("https://user:secret@pacs.example.org/dicom-web", "not in the URL"),
        ("https://pacs.example.org/dicom-web?x=1", "query"),
    ],
)
def test_only_plain_http_and_https_urls_are_accepted(url: str, message: str):
    with pytest.raises(ConfigError, match=message) as refused:
        PacsConnection(PacsSettings(url))
    assert "secret" not in refused.value.message


def test_incomplete_auth_settings_are_refused_before_any_request():
    with pytest.raises(ConfigError, match="username and a password"):
        PacsConnection(PacsSettings("https://pacs.example.org", auth="basic", username="u"))
    with pytest.raises(ConfigError, match="client certificate"):
        PacsConnection(PacsSettings("https://pacs.example.org", auth="cert"))
