"""Attacks from the hardening review, each played against a real hub process.

Every test here failed before the fix it names; docs/security.md cites them claim by claim.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import requests

from emix_core import crypto
from emix_core.client.home import LocalHome
from emix_core.client.hub import HubClient
from emix_core.testing import emix, emix_json, make_hub

pytestmark = pytest.mark.e2e


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def small_study(study_200: Path, tmp_path: Path, n: int = 3) -> Path:
    folder = tmp_path / "small"
    folder.mkdir(exist_ok=True)
    for p in sorted(study_200.rglob("*.dcm"))[:n]:
        shutil.copy(p, folder / p.name)
    return folder


def confirmation_code(mail: Any) -> str:
    body = mail.get_payload(decode=True).decode()
    return body.split("enter this code when asked:")[1].split()[0]


def audit_details(hub: Any) -> list[tuple[str, str, int]]:
    db = sqlite3.connect(hub.home / "audit.db")
    return [tuple(r) for r in db.execute("select event_type, detail, outcome from audit_events")]


# --------------------------------------------------------------------------- email squatting


def test_an_email_recipient_resolves_only_to_a_confirmed_member(
    hub, mercy, lakeside, smtp_server, study_200, tmp_path
):
    victim = "dr.who@mercy.example.org"
    # lakeside's admin squats an address of mercy's domain
    r = requests.post(
        f"{hub.url}/api/v1/members", json={"email": victim}, headers=auth(lakeside.token)
    )
    assert r.status_code == 201
    smtp_server.wait_for(1)
    folder = small_study(study_200, tmp_path)
    # a package for that address does not land at the squatter: it is refused
    result = emix("send", str(folder), "--to", victim, "--json", env=mercy.env, check=False)
    assert result.returncode == 1
    assert "confirmed" in json.loads(result.stdout)["message"]
    # the real owner can still be added by their own facility, and confirms
    r = requests.post(
        f"{hub.url}/api/v1/members", json={"email": victim}, headers=auth(mercy.token)
    )
    assert r.status_code == 201
    code = confirmation_code(smtp_server.wait_for(2)[1])
    emix_json("member", "confirm", code, "--hub", hub.url)
    # now the address resolves to mercy, and the sender is told so
    sent = emix_json("send", str(folder), "--to", victim, "--to", "lakeside", env=lakeside.env)
    assert sent["recipients"] == [
        {"to": victim, "facility": "mercy", "email": victim},
        {"to": "lakeside", "facility": "lakeside", "email": None},
    ]
    text = emix("send", str(folder), "--to", victim, env=lakeside.env).stdout
    assert f"{victim} → mercy" in text


# --------------------------------------------------------------------------- lock-out


def test_failed_sign_ins_never_lock_out_a_valid_token(hub, mercy):
    codes = [
        requests.get(f"{hub.url}/api/v1/inbox", headers=auth("emx_bad")).status_code
        for _ in range(12)
    ]
    assert codes[-1] == 429
    # the same address, the right token: served
    assert requests.get(f"{hub.url}/api/v1/inbox", headers=auth(mercy.token)).status_code == 200
    # a header the hub was not told to trust does not let a client escape its count
    r = requests.get(
        f"{hub.url}/api/v1/inbox", headers={**auth("emx_bad"), "X-Forwarded-For": "10.9.9.9"}
    )
    assert r.status_code == 429


def test_forwarded_for_is_honoured_from_the_trusted_proxy_hop_only(tmp_path, smtp_server):
    hub = make_hub(
        tmp_path,
        'trusted_proxy_hops = 1\nalert_email = "security@hub.example.org"',
        env={"EMIX_SMTP_URL": smtp_server.url},
    )
    try:
        hub.add_facility("Mercy", "a@mercy.example.org", "mercy")
        token = hub.facilities["mercy"]["token"]

        def get(client: str, tok: str) -> int:
            headers = {**auth(tok), "X-Forwarded-For": client}
            return requests.get(f"{hub.url}/api/v1/inbox", headers=headers).status_code

        # one client behind the proxy guesses; it alone is throttled
        assert [get("203.0.113.7", "emx_guess") for _ in range(11)][-1] == 429
        assert get("203.0.113.8", "emx_other") == 401
        assert get("203.0.113.7", token) == 200
        # a client prepending its own X-Forwarded-For cannot pose as another address:
        # only the proxy's hop (the last entry) counts
        assert get("198.51.100.1, 203.0.113.7", "emx_guess") == 429
        # an administrator is told by mail, once per burst
        alerts = [m for m in smtp_server.wait_for(1) if m["To"] == "security@hub.example.org"]
        assert len(alerts) == 1
        body = alerts[0].get_payload(decode=True).decode()
        assert "203.0.113.7" in body and "emx_guess" not in body
        rows = audit_details(hub)
        assert any(t == "security-alert" and "throttled" in d for t, d, _ in rows)
    finally:
        hub.stop()


def test_a_guessed_confirmation_code_is_throttled_per_client(hub):
    codes = [
        requests.post(f"{hub.url}/api/v1/members/confirm", json={"code": f"guess{i}"}).status_code
        for i in range(12)
    ]
    assert codes[:10] == [404] * 10 and codes[-1] == 429


# --------------------------------------------------------------------------- crafted manifests


def _open_package_with_one_item(hub, token: str, home: LocalHome) -> tuple[HubClient, str, dict]:
    client = HubClient(hub.url, token)
    home.register_key(client)
    package = client.create_package(["lakeside"])
    body = b"%PDF-1.4\n% crafted manifest test\n"
    sha = hashlib.sha256(body).hexdigest()
    client.upload_item(
        package, 1, io.BytesIO(body), size=len(body), sha256=sha, media_type="application/pdf"
    )
    item = {"id": 1, "name": "r.pdf", "media_type": "application/pdf", "size": len(body)}
    return client, package, {**item, "sha256": sha}


def _manifest(package: str, items: list, studies: list | None = None) -> dict:
    return {
        "format": "emix-manifest/1",
        "package": package,
        "sender": "mercy",
        "recipients": ["lakeside"],
        "created": "2026-01-01T00:00:00+00:00",
        "items": items,
        "studies": studies or [],
    }


@pytest.mark.parametrize(
    "craft",
    [
        lambda item: ([{**item, "id": 1.0}], None),
        lambda item: ([{**item, "id": True}], None),
        lambda item: ([item], [1]),
        lambda item: ([item, item], None),
        lambda item: ([{**item, "size": "33"}], None),
        lambda item: ([{**item, "media_type": "application/pdf\r\nX-Evil: 1"}], None),
        lambda item: ([{**item, "transfer_syntax_uid": "1.2\r\nContent-Type: text/html"}], None),
        lambda item: ([{**item, "study_uid": "../../etc"}], None),
        lambda item: ([item], [{"study_uid": "1.2.3", "patient_name": {"$gt": ""}}]),
    ],
    ids=[
        "float-id",
        "bool-id",
        "study-not-object",
        "duplicate-id",
        "string-size",
        "newline-media-type",
        "header-in-transfer-syntax",
        "path-as-uid",
        "object-as-name",
    ],
)
def test_a_crafted_manifest_is_refused_at_seal(hub, mercy, tmp_path, craft):
    home = LocalHome(tmp_path / "sender")
    client, package, item = _open_package_with_one_item(hub, mercy.token, home)
    items, studies = craft(item)
    signed = crypto.sign_document(home.signing_key, _manifest(package, items, studies))
    r = requests.post(
        f"{hub.url}/api/v1/packages/{package}/seal", json=signed, headers=auth(mercy.token)
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_input"
    assert "../" not in r.json()["message"] and "Evil" not in r.json()["message"]


def test_duplicate_sop_instance_uids_are_refused_at_seal(hub, mercy, tmp_path):
    home = LocalHome(tmp_path / "sender")
    client, package, item = _open_package_with_one_item(hub, mercy.token, home)
    body = b"%PDF-1.4\n% crafted manifest test\n"
    client.upload_item(
        package, 2, io.BytesIO(body), size=len(body), sha256=item["sha256"], media_type="x/y"
    )
    dicom = {"media_type": "application/dicom", "study_uid": "1.2", "series_uid": "1.2.3"}
    items = [
        {**item, **dicom, "sop_instance_uid": "1.2.3.4"},
        {**item, **dicom, "id": 2, "sop_instance_uid": "1.2.3.4"},
    ]
    signed = crypto.sign_document(home.signing_key, _manifest(package, items))
    r = requests.post(
        f"{hub.url}/api/v1/packages/{package}/seal", json=signed, headers=auth(mercy.token)
    )
    assert r.status_code == 400 and "SOP Instance UID" in r.json()["message"]


def _seal_as_an_older_hub_did(hub, package: str, signed: dict) -> None:
    """Seal without the checks of today's hub: packages sealed before an upgrade."""
    from emix_core.hub import packages as svc
    from emix_core.hub.context import open_hub
    from emix_core.model import utcnow
    from emix_core.store.db import PackageRow

    live = open_hub(hub.home)
    with live.db.session() as session:
        row = session.get(PackageRow, package)
        svc.put_small_blob(live, row, svc.MANIFEST_BLOB, crypto.canonical_json(signed))
        row.summary = svc.seal_summary(live, row, {"studies": []})
        row.state, row.sealed_at, row.item_count = "sealed", utcnow(), 1


class _Collect:
    """A destination that keeps what it is handed."""

    def __init__(self, settings: dict, _gateway: Any) -> None:
        self.name = settings["name"]
        self.got: list[str] = []

    def deliver(self, package: Any, path: Path) -> dict:
        self.got.append(package.id)
        return {"ok": True}


def test_one_crafted_package_never_stops_a_gateway(hub, mercy, lakeside, study_200, tmp_path):
    from emix_core.gateway.runner import Gateway
    from emix_core.plugins import get_plugin_manager, hookimpl

    sender = LocalHome(mercy.home)
    crafted = []
    for bad in ({"id": 1.0}, {"id": True}):
        client, package, item = _open_package_with_one_item(hub, mercy.token, sender)
        document = _manifest(package, [{**item, **bad}])
        _seal_as_an_older_hub_did(hub, package, crypto.sign_document(sender.signing_key, document))
        crafted.append(package)
    good = emix_json(
        "send", str(small_study(study_200, tmp_path)), "--to", "lakeside", env=mercy.env
    )

    class Kinds:
        @hookimpl
        def emix_register_destinations(self, register):  # type: ignore[no-untyped-def]
            register("collect", _Collect)

    pm = get_plugin_manager()
    pm.register(Kinds(), name="test-collect")
    config = tmp_path / "gateway.toml"
    config.write_text("")
    gateway = Gateway(
        config,
        {
            "home": str(lakeside.home),
            "hub_url": hub.url,
            "token": lakeside.token,
            "poll_seconds": 0.05,
            "retry_max_seconds": 1,
            "max_receive_attempts": 3,
        },
        destinations=[{"kind": "collect", "name": "mem"}],
        pm=pm,
    )
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        gateway.inbound.tick()  # never raises, whatever a package holds
        status = gateway.status()["inbound"]
        if len(status["failed"]) == 2 and status["packages"].get("delivered") == 1:
            break
        time.sleep(0.1)
    assert gateway.destinations[0].got == [good["package"]]
    failed = {f["package"]: f for f in status["failed"]}
    assert set(failed) == set(crafted)
    assert all(f["attempts"] == 3 and f["error"] for f in failed.values())


# --------------------------------------------------------------------------- upload races


def _slow_put(hub, path: str, token: str, body: bytes, sha: str):  # type: ignore[no-untyped-def]
    """A PUT whose body is still on its way: returns (socket, send_rest)."""
    import socket

    sock = socket.create_connection(("127.0.0.1", hub.port))
    head = (
        f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/pdf\r\nX-Emix-SHA256: {sha}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    sock.sendall(head + body[: len(body) // 2])

    def send_rest() -> int:
        sock.sendall(body[len(body) // 2 :])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        sock.close()
        return int(answer.split(b" ", 2)[1])

    return send_rest


def test_an_upload_in_flight_cannot_overwrite_a_sealed_item(hub, mercy, lakeside, tmp_path):
    import time

    home = LocalHome(tmp_path / "sender")
    client, package, item = _open_package_with_one_item(hub, mercy.token, home)
    other = b"%PDF-1.4\n% not what was signed\n".ljust(len(b"%PDF-1.4\n% crafted manifest test\n"))
    finish = _slow_put(
        hub,
        f"/api/v1/packages/{package}/items/1",
        mercy.token,
        other,
        hashlib.sha256(other).hexdigest(),
    )
    time.sleep(0.5)  # the upload is authorised and streaming
    signed = crypto.sign_document(home.signing_key, _manifest(package, [item]))
    client.seal(package, signed)
    assert finish() == 409
    got = b"".join(HubClient(hub.url, lakeside.token).download_item(package, 1))
    assert hashlib.sha256(got).hexdigest() == item["sha256"]
    zipped = requests.get(f"{hub.url}/api/v1/packages/{package}/zip", headers=auth(lakeside.token))
    assert zipped.status_code == 200 and other not in zipped.content


# --------------------------------------------------------------------------- slow clients


def test_slow_header_clients_are_cut_and_do_not_starve_the_hub(tmp_path):
    import socket
    import time

    hub = make_hub(tmp_path, "header_timeout_seconds = 3")
    slow = []
    try:
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", hub.port))
            sock.sendall(b"GET /api/v1/inbox HTTP/1.1\r\n")
            slow.append(sock)
        started = time.monotonic()
        while time.monotonic() - started < 8:  # one header line per client per second
            for i, sock in enumerate(slow):
                with contextlib.suppress(OSError):
                    sock.sendall(f"X-Slow-{i}: 1\r\n".encode())
            time.sleep(1)
        cut = 0
        for sock in slow:  # a cut connection reads as closed; a held one times out
            sock.settimeout(0.2)
            try:
                cut += sock.recv(1) == b""
            except TimeoutError:
                pass
            except OSError:
                cut += 1
        # every connection that held one of the 2 x 8 threads was cut (others wait unread)
        assert cut >= 16, f"only {cut} of 20 slow connections were cut"
        assert requests.get(f"{hub.url}/healthz", timeout=5).status_code == 200
    finally:
        for sock in slow:
            sock.close()
        hub.stop()


# --------------------------------------------------------------------------- logs


def test_the_access_log_names_route_templates_not_uids(hub, mercy, lakeside, study_200, tmp_path):
    sent = emix_json(
        "send", str(small_study(study_200, tmp_path)), "--to", "lakeside", env=mercy.env
    )
    package = sent["package"]
    requests.get(f"{hub.url}/api/v1/packages/{package}/items/2", headers=auth(lakeside.token))
    uid = "1.2.840.113619.2.55.3.604688119.868.1234567890.123"
    requests.get(f"{hub.url}/dicomweb/studies/{uid}/series", headers=auth(lakeside.token))
    requests.get(f"{hub.url}/api/v1/inbox?patient=MUSTERMANN", headers=auth(lakeside.token))
    hub.stop()
    log = (hub.home / "hub-test.log").read_text()
    assert '"GET /api/v1/packages/<package_id>/items/<int:item_id>" 200' in log
    leaked = [line for line in log.splitlines() if uid in line or "MUSTERMANN" in line]
    assert not leaked, leaked


# --------------------------------------------------------------------------- new users


def test_receive_into_a_relative_out_folder(hub, mercy, lakeside, study_200, tmp_path):
    import os
    import subprocess
    import sys

    package = emix_json(
        "send", str(small_study(study_200, tmp_path)), "--to", "lakeside", env=mercy.env
    )["package"]
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "emix_core", "receive", package, "--out", "./received"],
        cwd=work,
        env={**os.environ, **lakeside.env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert len(list((work / "received" / package).rglob("*.dcm"))) == 3
    status = requests.get(f"{hub.url}/api/v1/packages/{package}", headers=auth(mercy.token)).json()
    assert status["recipients"][0]["delivered"]  # the receipt was posted


def test_a_redirecting_hub_url_gets_a_clear_message(tmp_path, mercy):
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(301)
            self.send_header("Location", "https://hub.example.org" + self.path)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        result = emix("inbox", env={**mercy.env, "EMIX_HUB_URL": url}, check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert "redirects" in result.stderr and "https://hub.example.org" in result.stderr
    finally:
        server.shutdown()


# --------------------------------------------------------------------------- lost keys


def test_a_lost_kek_is_never_replaced_and_a_short_one_stops_the_start(
    hub, mercy, study_200, tmp_path
):
    emix_json("send", str(small_study(study_200, tmp_path)), "--to", "lakeside", env=mercy.env)
    hub.stop()
    kek = hub.home / "keys" / "kek.key"
    original = kek.read_bytes()
    kek.unlink()
    result = emix("hub", "init", "--home", str(hub.home), check=False)
    assert result.returncode == 1 and "restore" in result.stderr
    assert not kek.exists()
    for damaged in (original[:31], bytes(32)):  # cut short, or a new key over old data
        kek.write_bytes(damaged)
        kek.chmod(0o600)
        result = emix("hub", "serve", "--home", str(hub.home), check=False, timeout=60)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert "key" in result.stderr and "restore" in result.stderr.lower()
        kek.unlink()


def test_a_package_whose_key_does_not_unwrap_is_skipped_and_audited(
    hub, mercy, lakeside, study_200, tmp_path
):
    folder = small_study(study_200, tmp_path)
    first = emix_json("send", str(folder), "--to", "lakeside", env=mercy.env)["package"]
    second = emix_json("send", str(folder), "--to", "lakeside", env=mercy.env)["package"]
    db = sqlite3.connect(hub.home / "metadata.db")
    (wrapped,) = db.execute("select wrapped_key from packages where id = ?", (first,)).fetchone()
    damaged = bytes(wrapped[:-1]) + bytes([wrapped[-1] ^ 1])
    db.execute("update packages set wrapped_key = ? where id = ?", (damaged, first))
    db.commit()
    r = requests.get(f"{hub.url}/api/v1/inbox", headers=auth(lakeside.token))
    assert r.status_code == 200
    assert [p["id"] for p in r.json()["packages"]] == [second]
    assert any("does not unwrap" in d for _, d, _ in audit_details(hub))
    r = requests.get(f"{hub.url}/api/v1/packages/{first}/manifest", headers=auth(lakeside.token))
    assert r.status_code == 422 and str(hub.home) not in r.text


# --------------------------------------------------------------------------- audit gaps


def _hub_events(hub) -> list[dict]:
    from emix_core.audit.chain import AuditLog
    from emix_core.crypto import SigningKey, load_key_file

    keys = hub.home / "keys"
    log = AuditLog(
        hub.home / "audit.db",
        load_key_file(keys / "audit.key"),
        SigningKey.load_or_create(keys / "hub-signing.key"),
    )
    return log.events(limit=None, include_phi=True)


def test_audit_records_probes_listings_integrity_failures_and_removals(
    hub, mercy, lakeside, study_200, tmp_path, smtp_server
):
    from emix_core.testing import PATIENT_ID

    folder = small_study(study_200, tmp_path)
    package = emix_json("send", str(folder), "--to", "lakeside", env=mercy.env)["package"]
    other = hub.add_facility("Elsewhere", "x@else.example.org", "elsewhere")
    for path in ("/manifest", "/items/1", "/zip"):
        r = requests.get(f"{hub.url}/api/v1/packages/{package}{path}", headers=auth(other["token"]))
        assert r.status_code == 404
    requests.get(f"{hub.url}/api/v1/inbox", headers=auth(lakeside.token)).raise_for_status()
    blob = hub.home / "blobs" / package / "2"
    data = bytearray(blob.read_bytes())
    data[5000] ^= 1
    blob.write_bytes(bytes(data))
    r = requests.get(f"{hub.url}/api/v1/packages/{package}/items/2", headers=auth(lakeside.token))
    assert r.status_code == 422
    with pytest.raises(requests.RequestException):  # the stream is cut
        requests.get(
            f"{hub.url}/api/v1/packages/{package}/stream?first=1&last=3",
            headers=auth(lakeside.token),
        )
    added = requests.post(
        f"{hub.url}/api/v1/members",
        json={"email": "gone@lakeside.example.org"},
        headers=auth(lakeside.token),
    ).json()
    requests.delete(f"{hub.url}/api/v1/members/{added['id']}", headers=auth(lakeside.token))
    events = _hub_events(hub)
    denied = [e for e in events if e["detail"].startswith("access denied")]
    assert len(denied) == 3 and all(e["package_id"] == package for e in denied)
    (listing,) = [e for e in events if e["detail"].startswith("inbox listed")]
    assert listing["phi"]["packages"] == [package]
    assert listing["phi"]["patients"] == [PATIENT_ID]
    refused = [e for e in events if e["package_id"] == package and e["outcome"] == 8]
    assert any("refused (integrity)" in e["detail"] for e in refused)
    assert any("stream cut" in e["detail"] for e in refused)
    assert not any(e["detail"].startswith("items 1-3 downloaded") for e in events)
    assert any("gone@lakeside.example.org removed" in e["detail"] for e in events)


# --------------------------------------------------------------------------- low


def _raw(hub, request_bytes: bytes) -> int:
    import socket

    with socket.create_connection(("127.0.0.1", hub.port)) as sock:
        sock.sendall(request_bytes)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def test_hostile_requests_get_4xx_never_500(hub, mercy, lakeside, study_200, tmp_path):
    package = emix_json(
        "send", str(small_study(study_200, tmp_path)), "--to", "lakeside", env=mercy.env
    )["package"]
    deep = b"[" * 100_000 + b"]" * 100_000
    r = requests.post(f"{hub.url}/api/v1/members/confirm", data=deep)  # unauthenticated
    assert r.status_code == 400
    r = requests.post(
        f"{hub.url}/api/v1/members/confirm",
        data=b'{"code": "\\ud800"}',
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code in (400, 404)
    r = requests.post(
        f"{hub.url}/api/v1/members",
        data=b'{"email": "\\udc80@lakeside.example.org"}',
        headers={**auth(lakeside.token), "Content-Type": "application/json"},
    )
    assert r.status_code == 400
    r = requests.get(
        f"{hub.url}/api/v1/audit?package={package}&limit=abc", headers=auth(mercy.token)
    )
    assert r.status_code < 500
    for path in (f"/items/{10**30}", f"/stream?first=1&last={10**30}"):
        r = requests.get(f"{hub.url}/api/v1/packages/{package}{path}", headers=auth(lakeside.token))
        assert r.status_code in (400, 404), path
    opened = requests.post(
        f"{hub.url}/api/v1/packages", json={"to": ["lakeside"]}, headers=auth(mercy.token)
    ).json()["id"]
    body = b"%PDF-1.4\n"
    status = _raw(
        hub,
        (
            f"PUT /api/v1/packages/{opened}/items/1 HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {mercy.token}\r\nContent-Type: text/html\x0b<script>\r\n"
            f"X-Emix-SHA256: {hashlib.sha256(body).hexdigest()}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode("latin-1")
        + body,
    )
    assert status == 400


def test_unauthenticated_callers_cannot_tell_packages_apart(hub, mercy, study_200, tmp_path):
    package = emix_json(
        "send", str(small_study(study_200, tmp_path)), "--to", "lakeside", env=mercy.env
    )["package"]
    for path in ("", "/manifest", "/items/1", "/zip"):
        real = requests.get(f"{hub.url}/api/v1/packages/{package}{path}")
        missing = requests.get(f"{hub.url}/api/v1/packages/{'0' * 32}{path}")
        assert real.status_code == missing.status_code == 401, path
        assert real.json() == missing.json()


def test_downloads_carry_no_store_nosniff_and_attachment(hub, mercy, lakeside, study_200, tmp_path):
    package = emix_json(
        "send", str(small_study(study_200, tmp_path)), "--to", "lakeside", env=mercy.env
    )["package"]
    r = requests.get(f"{hub.url}/api/v1/packages/{package}/items/1", headers=auth(lakeside.token))
    assert r.status_code == 200
    assert r.headers["Cache-Control"] == "no-store"
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["Content-Disposition"].startswith("attachment")
    r = requests.get(f"{hub.url}/api/v1/inbox", headers=auth(lakeside.token))
    assert r.headers["Cache-Control"] == "no-store"


def test_an_expired_package_is_gone_before_the_purge(hub, mercy, lakeside, study_200, tmp_path):
    package = emix_json(
        "send", str(small_study(study_200, tmp_path)), "--to", "lakeside", env=mercy.env
    )["package"]
    db = sqlite3.connect(hub.home / "metadata.db")
    db.execute(
        "update packages set expires = '2000-01-01 00:00:00.000000' where id = ?", (package,)
    )
    db.commit()
    for path in ("/manifest", "/items/1", "/zip"):
        r = requests.get(f"{hub.url}/api/v1/packages/{package}{path}", headers=auth(lakeside.token))
        assert r.status_code == 404, path


def test_only_an_admin_registers_the_facility_key_first(hub, lakeside, smtp_server, tmp_path):
    requests.post(
        f"{hub.url}/api/v1/members",
        json={"email": "tech@lakeside.example.org"},
        headers=auth(lakeside.token),
    ).raise_for_status()
    code = confirmation_code(smtp_server.wait_for(1)[0])
    token = requests.post(f"{hub.url}/api/v1/members/confirm", json={"code": code}).json()["token"]
    attacker = LocalHome(tmp_path / "attacker")
    r = requests.put(
        f"{hub.url}/api/v1/facilities/me/key",
        json={"public_key": attacker.signing_key.public_key_b64},
        headers=auth(token),
    )
    assert r.status_code == 409
    admin = LocalHome(tmp_path / "admin")
    admin.register_key(HubClient(hub.url, lakeside.token))
    r = requests.get(f"{hub.url}/api/v1/facilities/lakeside/key", headers=auth(token))
    assert r.json()["public_key"] == admin.signing_key.public_key_b64


def test_a_member_removed_before_confirming_cannot_confirm(hub, lakeside, smtp_server):
    added = requests.post(
        f"{hub.url}/api/v1/members",
        json={"email": "leaver@lakeside.example.org"},
        headers=auth(lakeside.token),
    ).json()
    code = confirmation_code(smtp_server.wait_for(1)[0])
    requests.delete(f"{hub.url}/api/v1/members/{added['id']}", headers=auth(lakeside.token))
    r = requests.post(f"{hub.url}/api/v1/members/confirm", json={"code": code})
    assert r.status_code == 404 and "token" not in r.json()


# --------------------------------------------------------------------------- audit tail


def test_a_cut_tail_of_the_hub_log_is_detected_with_the_facilities_checkpoints(
    hub, mercy, lakeside, study_200, tmp_path
):
    package = emix_json(
        "send", str(small_study(study_200, tmp_path)), "--to", "lakeside", env=mercy.env
    )["package"]
    emix_json("receive", package, "--out", str(tmp_path / "in"), env=lakeside.env)
    emix("inbox", env=lakeside.env)
    hub.stop()
    db = sqlite3.connect(hub.home / "audit.db")
    (kept,) = db.execute("select max(seq) from audit_checkpoints").fetchone()
    (last,) = db.execute("select max(seq) from audit_events").fetchone()
    assert last > kept
    db.execute("delete from audit_events where seq > ?", (kept,))  # the downloads vanish
    db.commit()
    db.close()
    # the hub's own log cannot tell (said plainly in docs/security.md) ...
    assert emix_json("audit", "verify", "--home", str(hub.home))["ok"] is True
    # ... the recipient's kept checkpoint can
    kept_by_lakeside = tmp_path / "lakeside-checkpoints.json"
    kept_by_lakeside.write_text(emix("audit", "checkpoints", "--home", str(lakeside.home)).stdout)
    result = emix(
        "audit",
        "verify",
        "--home",
        str(hub.home),
        "--checkpoints",
        str(kept_by_lakeside),
        "--json",
        check=False,
    )
    assert result.returncode == 1
    assert "tail cut" in json.loads(result.stdout)["reason"]


def test_the_checkpoint_signing_key_can_live_outside_the_hub_home(tmp_path, smtp_server):
    outside = tmp_path / "elsewhere" / "audit-signing.key"
    hub = make_hub(tmp_path, f'audit_signing_key = "{outside}"')
    try:
        info = requests.get(f"{hub.url}/api/v1/hub").json()
        from emix_core.crypto import SigningKey

        assert info["audit_public_key"] == SigningKey.load_or_create(outside).public_key_b64
    finally:
        hub.stop()


def test_confirmation_codes_come_from_stdin_and_expire(hub, lakeside, smtp_server, tmp_path):
    import os
    import subprocess
    import sys

    for email in ("new@lakeside.example.org", "late@lakeside.example.org"):
        requests.post(
            f"{hub.url}/api/v1/members", json={"email": email}, headers=auth(lakeside.token)
        ).raise_for_status()
    mails = {m["To"]: confirmation_code(m) for m in smtp_server.wait_for(2)}
    result = subprocess.run(
        [sys.executable, "-m", "emix_core", "member", "confirm", "--hub", hub.url, "--json"],
        input=mails["new@lakeside.example.org"] + "\n",
        capture_output=True,
        text=True,
        env={**os.environ, "EMIX_HOME": str(tmp_path / "new")},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["token"].startswith("emx_")
    db = sqlite3.connect(hub.home / "metadata.db")
    db.execute(
        "update members set created = '2020-01-01 00:00:00.000000' where email = ?",
        ("late@lakeside.example.org",),
    )
    db.commit()
    r = requests.post(
        f"{hub.url}/api/v1/members/confirm", json={"code": mails["late@lakeside.example.org"]}
    )
    assert r.status_code == 404


def test_a_token_in_a_world_readable_config_is_refused(hub, mercy, tmp_path):
    home = tmp_path / "careless"
    home.mkdir()
    config = home / "emix.toml"
    config.write_text(f'[client]\nhub_url = "{hub.url}"\ntoken = "{mercy.token}"\n')
    config.chmod(0o644)
    result = emix(
        "inbox", env={"EMIX_HOME": str(home), "EMIX_TOKEN": "", "EMIX_HUB_URL": ""}, check=False
    )
    assert result.returncode == 1 and "chmod 600" in result.stderr
    config.chmod(0o600)
    assert (
        emix("inbox", env={"EMIX_HOME": str(home), "EMIX_TOKEN": "", "EMIX_HUB_URL": ""}).returncode
        == 0
    )


def test_the_receiver_picks_a_document_extension_from_its_media_type(
    hub, mercy, lakeside, tmp_path
):
    folder = tmp_path / "docs"
    folder.mkdir()
    body = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
    (folder / "report.pdf.exe").write_bytes(body)
    sent = emix_json("send", str(folder), "--to", "lakeside", env=mercy.env)
    out = tmp_path / "in"
    emix_json("receive", sent["package"], "--out", str(out), env=lakeside.env)
    names = sorted(p.name for p in (out / sent["package"] / "documents").iterdir())
    assert "0001-report.pdf" in names and not [n for n in names if ".exe" in n]


def test_receipts_are_never_overwritten_misattributed_or_back_dated(
    hub, mercy, lakeside, study_200, tmp_path
):
    package = emix_json(
        "send", str(small_study(study_200, tmp_path)), "--to", "lakeside", env=mercy.env
    )["package"]
    emix_json("receive", package, "--out", str(tmp_path / "in"), env=lakeside.env)
    status = requests.get(f"{hub.url}/api/v1/packages/{package}", headers=auth(mercy.token)).json()
    delivered = status["recipients"][0]["delivered"]
    home = LocalHome(lakeside.home)
    from datetime import UTC, datetime

    def post(**changes: Any) -> requests.Response:
        receipt = {
            "format": "emix-receipt/1",
            "package": package,
            "recipient": "lakeside",
            "member": "it@lakeside.example.org",
            "received": datetime.now(UTC).isoformat(),
            "items": [],
            **changes,
        }
        return requests.post(
            f"{hub.url}/api/v1/packages/{package}/receipt",
            json=crypto.sign_document(home.signing_key, receipt),
            headers=auth(lakeside.token),
        )

    assert post(member="someone.else@lakeside.example.org").status_code == 400
    assert post(received="2020-01-01T00:00:00+00:00").status_code == 400
    again = post()
    assert again.status_code == 200 and again.json()["receipt"] == "kept-first"
    status = requests.get(f"{hub.url}/api/v1/packages/{package}", headers=auth(mercy.token)).json()
    assert status["recipients"][0]["delivered"] == delivered
