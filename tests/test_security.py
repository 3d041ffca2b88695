"""Each claim in docs/security.md, played by an attacker against a real hub process."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import pydicom
import pytest
import requests

from emix_core import crypto
from emix_core.client.home import LocalHome
from emix_core.client.hub import HubClient
from emix_core.client.receiver import receive_package
from emix_core.errors import IntegrityError
from emix_core.testing import emix, emix_json, make_hub, wait_for_http


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def small_study(study_200: Path, tmp_path: Path, n: int = 3) -> Path:
    folder = tmp_path / "small"
    folder.mkdir()
    for p in sorted(study_200.rglob("*.dcm"))[:n]:
        shutil.copy(p, folder / p.name)
    return folder


def test_missing_or_wrong_token_gets_401_without_detail(hub, mercy):
    for headers in ({}, auth("emx_" + "A" * 43), {"Authorization": "Basic Zm9vOmJhcg=="}):
        r = requests.get(f"{hub.url}/api/v1/inbox", headers=headers)
        assert r.status_code == 401
        assert r.json() == {"error": "unauthenticated", "message": "authentication required"}
    r = emix("inbox", env={**mercy.env, "EMIX_TOKEN": "emx_wrong"}, check=False)
    assert r.returncode == 1 and "refused the token" in r.stderr


def test_repeated_failed_sign_ins_are_throttled_and_raise_an_alert(hub):
    codes = [
        requests.get(f"{hub.url}/api/v1/inbox", headers=auth("emx_bad")).status_code
        for _ in range(12)
    ]
    assert codes[:10] == [401] * 10 and codes[-1] == 429
    db = sqlite3.connect(hub.home / "audit.db")
    types = [row[0] for row in db.execute("select event_type from audit_events")]
    assert "security-alert" in types


def test_upload_not_matching_its_sha256_is_rejected_and_nothing_stored(hub, mercy):
    package = requests.post(
        f"{hub.url}/api/v1/packages", json={"to": ["lakeside"]}, headers=auth(mercy.token)
    ).json()["id"]
    body = b"%PDF-1.4 not what was declared" * 100
    r = requests.put(
        f"{hub.url}/api/v1/packages/{package}/items/1",
        data=body,
        headers={
            **auth(mercy.token),
            "Content-Type": "application/pdf",
            "X-Emix-SHA256": hashlib.sha256(b"other").hexdigest(),
        },
    )
    assert r.status_code == 422 and "SHA-256" in r.json()["message"]
    blob_dir = hub.home / "blobs" / package
    assert not blob_dir.exists() or not any(blob_dir.iterdir())
    db = sqlite3.connect(hub.home / "metadata.db")
    assert db.execute("select count(*) from items").fetchone()[0] == 0


@pytest.mark.e2e  # a real process
def test_oversize_item_gets_413(tmp_path, smtp_server):
    hub = make_hub(tmp_path, "max_item_bytes = 100000")
    try:
        hub.add_facility("Mercy", "a@m.example.org", "mercy")
        hub.add_facility("Lake", "b@l.example.org", "lakeside")
        token = hub.facilities["mercy"]["token"]
        package = requests.post(
            f"{hub.url}/api/v1/packages", json={"to": ["lakeside"]}, headers=auth(token)
        ).json()["id"]
        body = b"x" * 200_000
        r = requests.put(
            f"{hub.url}/api/v1/packages/{package}/items/1",
            data=body,
            headers={**auth(token), "X-Emix-SHA256": hashlib.sha256(body).hexdigest()},
        )
        assert r.status_code == 413 and "limit" in r.json()["message"]
        r = requests.post(
            f"{hub.url}/api/v1/packages",
            data=b"{" + b" " * 5_000_000 + b"}",
            headers={**auth(token), "Content-Type": "application/json"},
        )
        assert r.status_code == 413
    finally:
        hub.stop()


def test_tampered_ciphertext_never_returns_altered_bytes(hub, mercy, lakeside, study_200, tmp_path):
    package = emix_json(
        "send", str(small_study(study_200, tmp_path)), "--to", "lakeside", env=mercy.env
    )["package"]
    blob = hub.home / "blobs" / package / "2"
    data = bytearray(blob.read_bytes())
    data[5000] ^= 0x01
    blob.write_bytes(bytes(data))
    r = requests.get(f"{hub.url}/api/v1/packages/{package}/items/2", headers=auth(lakeside.token))
    assert r.status_code == 422 and r.json()["error"] == "integrity"
    out = tmp_path / "out"
    result = emix("receive", package, "--out", str(out), env=lakeside.env, check=False)
    assert result.returncode == 1 and "integrity" in result.stderr.lower()
    assert not (out / package).exists()
    assert not any(out.iterdir())  # no staging folder left behind


def test_tampered_manifest_blob_is_refused(hub, mercy, lakeside, study_200, tmp_path):
    package = emix_json(
        "send", str(small_study(study_200, tmp_path)), "--to", "lakeside", env=mercy.env
    )["package"]
    blob = hub.home / "blobs" / package / "manifest"
    data = bytearray(blob.read_bytes())
    data[-20] ^= 0x80
    blob.write_bytes(bytes(data))
    r = requests.get(f"{hub.url}/api/v1/packages/{package}/manifest", headers=auth(lakeside.token))
    assert r.status_code == 422


def test_swapped_blobs_between_items_are_detected(hub, mercy, lakeside, study_200, tmp_path):
    package = emix_json(
        "send", str(small_study(study_200, tmp_path)), "--to", "lakeside", env=mercy.env
    )["package"]
    a, b = hub.home / "blobs" / package / "1", hub.home / "blobs" / package / "2"
    da, db_ = a.read_bytes(), b.read_bytes()
    a.write_bytes(db_)
    b.write_bytes(da)
    r = requests.get(f"{hub.url}/api/v1/packages/{package}/items/1", headers=auth(lakeside.token))
    assert r.status_code == 422


def test_other_facilities_get_404_never_403(hub, mercy, study_200, tmp_path):
    other = hub.add_facility("Elsewhere Clinic", "x@else.example.org", "elsewhere")
    package = emix_json(
        "send", str(small_study(study_200, tmp_path)), "--to", "lakeside", env=mercy.env
    )["package"]
    for path in ("", "/manifest", "/items/1", "/zip"):
        r = requests.get(f"{hub.url}/api/v1/packages/{package}{path}", headers=auth(other["token"]))
        assert r.status_code == 404, path
    missing = "0" * 32
    r = requests.get(f"{hub.url}/api/v1/packages/{missing}/manifest", headers=auth(other["token"]))
    assert (
        r.status_code == 404
        and r.json()
        == requests.get(
            f"{hub.url}/api/v1/packages/{package}/manifest", headers=auth(other["token"])
        ).json()
    )
    assert (
        requests.get(f"{hub.url}/api/v1/inbox", headers=auth(other["token"])).json()["packages"]
        == []
    )
    # the sender may follow its package but cannot download the recipient's copy
    r = requests.get(f"{hub.url}/api/v1/packages/{package}/items/1", headers=auth(mercy.token))
    assert r.status_code == 404


def test_package_for_one_member_is_hidden_from_other_members(
    hub, mercy, lakeside, study_200, tmp_path, smtp_server
):
    for email in ("dr.who@lakeside.example.org", "dr.no@lakeside.example.org"):
        requests.post(
            f"{hub.url}/api/v1/members", json={"email": email}, headers=auth(lakeside.token)
        ).raise_for_status()
    codes = {}
    for mail in smtp_server.wait_for(2):
        body = mail.get_payload(decode=True).decode()
        code = body.split("enter this code when asked:")[1].split()[0]
        codes[mail["To"]] = code
    tokens = {}
    for email, code in codes.items():
        tokens[email] = emix_json("member", "confirm", code, "--hub", hub.url)["token"]
    # a code works once
    again = requests.post(
        f"{hub.url}/api/v1/members/confirm", json={"code": codes["dr.who@lakeside.example.org"]}
    )
    assert again.status_code == 404
    package = emix_json(
        "send",
        str(small_study(study_200, tmp_path)),
        "--to",
        "dr.who@lakeside.example.org",
        env=mercy.env,
    )["package"]

    def visible(token: str) -> bool:
        return (
            requests.get(
                f"{hub.url}/api/v1/packages/{package}/manifest", headers=auth(token)
            ).status_code
            == 200
        )

    assert visible(tokens["dr.who@lakeside.example.org"])
    assert visible(lakeside.token)  # the facility's admin
    assert not visible(tokens["dr.no@lakeside.example.org"])


def test_unconfirmed_member_cannot_download(hub, lakeside, smtp_server):
    r = requests.post(
        f"{hub.url}/api/v1/members",
        json={"email": "new@lakeside.example.org"},
        headers=auth(lakeside.token),
    )
    assert r.status_code == 201 and r.json()["confirmed"] is False
    assert "token" not in r.json()


def test_changed_sender_key_is_refused_loudly(hub, mercy, lakeside, study_200, tmp_path):
    small = small_study(study_200, tmp_path)
    first = emix_json("send", str(small), "--to", "lakeside", env=mercy.env)["package"]
    emix_json("receive", first, "--out", str(tmp_path / "r1"), env=lakeside.env)
    # an attacker (or a careless admin) registers another key for mercy
    emix("hub", "facility", "reset-key", "mercy", "--home", str(hub.home))
    impostor = {**mercy.env, "EMIX_HOME": str(tmp_path / "impostor")}
    second = emix_json("send", str(small), "--to", "lakeside", env=impostor)["package"]
    result = emix("receive", second, "--out", str(tmp_path / "r2"), env=lakeside.env, check=False)
    assert result.returncode == 1
    assert "signing key of 'facility:mercy' changed" in result.stderr
    assert not (tmp_path / "r2" / second).exists()


def test_hostile_names_and_uids_never_become_paths(hub, mercy, lakeside, tmp_path):
    sender = LocalHome(tmp_path / "sender-home")
    client = HubClient(hub.url, mercy.token)
    sender.register_key(client)
    package = client.create_package(["lakeside"])
    body = b"%PDF-1.4\n% hostile name test\n"
    sha = hashlib.sha256(body).hexdigest()
    import io

    for item_id in (1, 2):
        client.upload_item(
            package,
            item_id,
            io.BytesIO(body),
            size=len(body),
            sha256=sha,
            media_type="application/pdf",
        )
    hostile = {
        "id": 1,
        "name": "../../../../tmp/evil\x00.pdf",
        "media_type": "application/pdf",
        "size": len(body),
        "sha256": sha,
    }
    hostile_dicom = {
        "id": 2,
        "name": "x" * 1000,
        "media_type": "application/dicom",
        "size": len(body),
        "sha256": sha,
        "study_uid": "1.2.840.99",  # a UID that is a path is refused at seal (test_hardening)
        "series_uid": "1.2",
        "sop_instance_uid": "1.2.3",
    }
    manifest = {
        "format": "emix-manifest/1",
        "package": package,
        "sender": "mercy",
        "recipients": ["lakeside"],
        "created": "2026-01-01T00:00:00+00:00",
        "items": [hostile, hostile_dicom],
        "studies": [],
    }
    client.seal(package, crypto.sign_document(sender.signing_key, manifest))
    out = tmp_path / "inbox"
    got = receive_package(
        package,
        out,
        client=HubClient(hub.url, lakeside.token),
        home=LocalHome(tmp_path / "lake-home"),
    )
    for _item, path in got.items:
        assert path.resolve().is_relative_to((out / package).resolve())
        assert len(path.name) <= 130
    assert not Path("/tmp/evil.pdf").exists()


def test_hostile_uid_in_a_dicom_file_is_refused_without_echoing_it(hub, mercy, study_200, tmp_path):
    folder = tmp_path / "hostile"
    folder.mkdir()
    ds = pydicom.dcmread(next(study_200.rglob("*.dcm")))
    ds.SOPInstanceUID = "../../../etc/passwd"
    ds.save_as(folder / "evil.dcm")
    result = emix("send", str(folder), "--to", "lakeside", "--json", env=mercy.env, check=False)
    assert result.returncode == 1
    assert "etc/passwd" not in json.loads(result.stdout)["failed"][0]["error"]


@pytest.mark.e2e  # a real process
def test_hub_refuses_a_public_address_without_tls(tmp_path):
    home = tmp_path / "hub"
    emix("hub", "init", "--home", str(home))
    result = emix("hub", "serve", "--home", str(home), "--host", "0.0.0.0", check=False, timeout=30)
    assert result.returncode == 1 and "without TLS" in result.stderr


@pytest.mark.e2e  # a real process
def test_tls_listener_serves_https(tmp_path):
    """With --tls-cert/--tls-key the hub speaks HTTPS (self-signed cert made here)."""
    import datetime as dt
    import subprocess
    import sys

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from emix_core.testing import free_port

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
        .not_valid_after(dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "hub.crt", tmp_path / "hub.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    home = tmp_path / "hub"
    emix("hub", "init", "--home", str(home))
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "emix_core",
            "hub",
            "serve",
            "--home",
            str(home),
            "--port",
            str(port),
            "--tls-cert",
            str(cert_path),
            "--tls-key",
            str(key_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        r = wait_for_http(f"https://127.0.0.1:{port}/healthz", process, verify=str(cert_path))
        assert r.status_code == 200
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    finally:
        process.terminate()
        process.wait(timeout=15)


def test_integrity_error_is_raised_in_process_for_a_cut_download(
    hub, mercy, lakeside, study_200, tmp_path
):
    """A blob cut short on disk (lost tail) is refused, never delivered short."""
    package = emix_json(
        "send", str(small_study(study_200, tmp_path)), "--to", "lakeside", env=mercy.env
    )["package"]
    blob = hub.home / "blobs" / package / "1"
    blob.write_bytes(blob.read_bytes()[:-100])
    with pytest.raises(IntegrityError):
        receive_package(
            package,
            tmp_path / "cut",
            client=HubClient(hub.url, lakeside.token),
            home=LocalHome(tmp_path / "lh"),
        )


def test_batch_upload_refuses_a_frame_whose_bytes_do_not_match_and_keeps_the_rest(hub, mercy):
    from emix_core import frames

    package = requests.post(
        f"{hub.url}/api/v1/packages", json={"to": ["lakeside"]}, headers=auth(mercy.token)
    ).json()["id"]
    good, bad = b"%PDF-1.4 good" * 100, b"%PDF-1.4 bad" * 100
    body = (
        frames.encode_header(1, len(good), "application/pdf")
        + good
        + hashlib.sha256(good).digest()
        + frames.encode_header(2, len(bad), "application/pdf")
        + bad
        + hashlib.sha256(b"something else").digest()
        + frames.END_MAGIC
    )
    r = requests.post(
        f"{hub.url}/api/v1/packages/{package}/items",
        data=body,
        headers={**auth(mercy.token), "Content-Type": frames.MEDIA_TYPE},
    )
    assert r.status_code == 201
    assert r.json()["stored"] == [1]
    assert r.json()["failed"][0]["id"] == 2 and "SHA-256" in r.json()["failed"][0]["error"]
    assert not (hub.home / "blobs" / package / "2").exists()
    junk = requests.post(
        f"{hub.url}/api/v1/packages/{package}/items",
        data=b"GARBAGE" * 10,
        headers={**auth(mercy.token), "Content-Type": frames.MEDIA_TYPE},
    )
    assert junk.status_code == 400 and "malformed" in junk.json()["message"]


def test_revoked_and_expired_tokens_are_refused(hub, mercy, lakeside):
    assert requests.get(f"{hub.url}/api/v1/me", headers=auth(mercy.token)).status_code == 200
    r = requests.delete(f"{hub.url}/api/v1/tokens/current", headers=auth(mercy.token))
    assert r.status_code == 200
    assert requests.get(f"{hub.url}/api/v1/me", headers=auth(mercy.token)).status_code == 401
    db = sqlite3.connect(hub.home / "metadata.db")
    stored = [row[0] for row in db.execute("select token_hash from tokens")]
    assert lakeside.token not in stored  # only hashes are kept
    db.execute("update tokens set expires = '2001-01-01 00:00:00.000000'")
    db.commit()
    assert requests.get(f"{hub.url}/api/v1/me", headers=auth(lakeside.token)).status_code == 401
