"""Errors that help: each way of not reaching a hub has its own message and its fix."""

from __future__ import annotations

import http.server
import json
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from emix_core.testing import emix, emix_json, free_port, make_certificates


@contextmanager
def web_server(certfile: Path | None = None) -> Iterator[int]:
    """A plain web server (not a hub) answering 404 "File not found", optionally over TLS."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def translate_path(self, path: str) -> str:
            return "/nonexistent-folder/x"

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    if certfile is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certfile)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def inbox_error(tmp_path: Path, url: str, *extra: str) -> str:
    result = emix(
        *extra, "inbox", "--hub", url, "--token", "t", "--home", str(tmp_path / "h"), check=False
    )
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stderr
    return result.stderr


def test_connection_refused_names_the_port(tmp_path: Path) -> None:
    port = free_port()
    error = inbox_error(tmp_path, f"http://127.0.0.1:{port}")
    assert f"nothing is listening at 127.0.0.1:{port} (connection refused)" in error


def test_unknown_host_is_a_dns_error(tmp_path: Path) -> None:
    error = inbox_error(tmp_path, "http://no-such-hub.invalid")
    assert "'no-such-hub.invalid' could not be resolved (DNS)" in error


def test_a_url_ending_in_api_v1_says_what_to_use(tmp_path: Path) -> None:
    error = inbox_error(tmp_path, "http://127.0.0.1:8480/api/v1/")
    assert "without /api/v1: use http://127.0.0.1:8480" in error


def test_a_web_server_that_is_not_a_hub(tmp_path: Path) -> None:
    with web_server() as port:
        error = inbox_error(tmp_path, f"http://127.0.0.1:{port}")
    assert "is not an emix hub" in error
    assert "File not found" in error or "404" in error


def test_https_spoken_to_a_plain_http_port(tmp_path: Path) -> None:
    with web_server() as port:
        error = inbox_error(tmp_path, f"https://127.0.0.1:{port}")
    assert "does not speak HTTPS" in error
    assert f"use http://127.0.0.1:{port}" in error


def test_private_ca_certificate_failure_hints_at_ca_bundle(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "tls")
    with web_server(certs.server) as port:
        url = f"https://127.0.0.1:{port}"
        error = inbox_error(tmp_path, url)
        assert "could not be verified" in error
        for hint in ("--ca-bundle", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "[client]"):
            assert hint in error
        # with the CA, global or per command, TLS passes and the next problem shows
        assert "not an emix hub" in inbox_error(tmp_path, url, "--ca-bundle", str(certs.ca))
        per_command = emix(
            "inbox", "--ca-bundle", str(certs.ca), "--hub", url, "--token", "t",
            "--home", str(tmp_path / "h"), check=False,
        )  # fmt: skip
        assert "not an emix hub" in per_command.stderr
        via_env = emix(
            "inbox", "--hub", url, "--token", "t", "--home", str(tmp_path / "h"),
            env={"REQUESTS_CA_BUNDLE": "", "SSL_CERT_FILE": str(certs.ca)}, check=False,
        )  # fmt: skip
        assert "not an emix hub" in via_env.stderr


def test_verbose_logs_with_timestamps_on_every_command(tmp_path: Path) -> None:
    port = free_port()
    for args in (["-v", "inbox"], ["inbox", "-v"]):
        error = inbox_error(tmp_path, f"http://127.0.0.1:{port}", *args[:-1]) if args[0] == "-v" \
            else emix("inbox", "-v", "--hub", f"http://127.0.0.1:{port}", "--token", "t",
                      "--home", str(tmp_path / "h"), check=False).stderr  # fmt: skip
        assert "DEBUG emix.client: GET /inbox failed (refused)" in error
        assert error[:4].isdigit()  # a timestamp leads the line
    for command in (["hub", "facility", "add"], ["audit", "verify"], ["gateway", "run"]):
        assert "--verbose" in emix(*command, "--help").stdout


def test_hub_init_and_facility_add_on_the_command_line(tmp_path: Path) -> None:
    # the fixtures make hubs and facilities in-process: this is their command line
    home = tmp_path / "hub"
    made = emix_json("hub", "init", "--home", str(home), "--port", "8123")
    assert made["public_url"] == "http://127.0.0.1:8123" and made["home"] == str(home)
    added = emix_json(
        "hub", "facility", "add", "Mercy General", "--email", "admin@mercy.example.org",
        "--address", "mercy", "--report-format", "hl7", "--home", str(home),
    )  # fmt: skip
    assert added["address"] == "mercy" and added["token"].startswith("emx_")
    text = emix("hub", "facility", "add", "Lakeside Imaging", "--email", "it@lakeside.example.org",
                "--home", str(home)).stdout  # fmt: skip
    assert "facility lakeside-imaging added" in text and "shown once" in text
    listed = emix_json("hub", "facility", "list", "--home", str(home))
    assert sorted(f["address"] for f in listed["facilities"]) == ["lakeside-imaging", "mercy"]


def test_hub_init_refuses_a_facility_home(tmp_path: Path) -> None:
    from emix_core.client.home import LocalHome

    facility = tmp_path / "facility"
    LocalHome(facility).signing_key  # noqa: B018 - creates the facility's key
    result = emix("hub", "init", "--home", str(facility), check=False)
    assert result.returncode == 1
    assert "is a facility's home" in result.stderr
    assert not (facility / "keys" / "kek.key").exists()
    configured = tmp_path / "configured"
    configured.mkdir()
    (configured / "emix.toml").write_text('[client]\nhub_url = "https://hub.example.org"\n')
    assert "facility's home" in emix("hub", "init", "--home", str(configured), check=False).stderr
    listing = emix("hub", "facility", "list", "--home", str(facility), check=False)
    assert "facility's home" in listing.stderr and "emix hub init" not in listing.stderr


@pytest.mark.e2e
def test_facilities_directory_and_unknown_recipient_hint(hub, mercy, tmp_path: Path) -> None:
    listed = emix_json("facilities", env=mercy.env)["facilities"]
    assert [f["address"] for f in listed] == ["lakeside", "mercy"]
    text = emix("facilities", env=mercy.env).stdout
    assert "Lakeside Imaging" in text and "lakeside" in text
    study = tmp_path / "note.txt"
    study.write_text("report text\n")
    sent = emix("send", str(study), "--to", "nowhere", env=mercy.env, check=False)
    assert sent.returncode == 1
    assert "`emix facilities`" in sent.stderr
    assert "emix hub" not in sent.stderr


@pytest.mark.e2e
def test_doctor_checks_a_facility_setup(hub, mercy, tmp_path: Path) -> None:
    note = tmp_path / "note.txt"
    note.write_text("report text\n")
    emix("send", str(note), "--to", "lakeside", env=mercy.env)  # registers and pins keys
    report = emix_json("doctor", env=mercy.env)
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert report["ok"] is True, report
    for name in ("home", "config", "hub", "clock", "token", "signing-key", "pins"):
        assert status[name] == "ok", report
    # a token in a world-readable emix.toml is flagged; a wrong token fails
    config = mercy.home / "emix.toml"
    config.write_text(f'[client]\nhub_url = "{hub.url}"\ntoken = "{mercy.token}"\n')
    config.chmod(0o644)
    env = {**mercy.env, "EMIX_TOKEN": "wrong"}
    bad = emix("doctor", "--json", env=env, check=False)
    assert bad.returncode == 1
    checks = {c["name"]: c for c in json.loads(bad.stdout)["checks"]}
    assert checks["config-permissions"]["status"] == "fail"
    assert "chmod 600" in checks["config-permissions"]["detail"]
    config.chmod(0o600)  # a world-readable token is refused before it is tried
    bad = emix("doctor", "--json", env=env, check=False)
    assert bad.returncode == 1
    checks = {c["name"]: c for c in json.loads(bad.stdout)["checks"]}
    assert checks["token"]["status"] == "fail"
    # an unreachable hub names the cause
    down = emix("doctor", env={**mercy.env, "EMIX_HUB_URL": f"http://127.0.0.1:{free_port()}"},
                check=False)  # fmt: skip
    assert down.returncode == 1 and "connection refused" in down.stdout


@pytest.mark.e2e
def test_members_and_token_commands(hub, mercy, lakeside, smtp_server) -> None:
    emix("members", "add", "tech@mercy.example.org", env=mercy.env)
    listed = emix_json("members", "list", env=mercy.env)["members"]
    assert {m["email"] for m in listed} == {"admin@mercy.example.org", "tech@mercy.example.org"}
    assert "tech@mercy.example.org" in emix("members", "list", env=mercy.env).stdout
    # deny by default: lakeside's admin does not see or remove mercy's members
    assert "mercy" not in emix("members", "list", "--json", env=lakeside.env).stdout
    refused = emix("members", "remove", "tech@mercy.example.org", env=lakeside.env, check=False)
    assert refused.returncode == 1
    emix("members", "remove", "tech@mercy.example.org", env=mercy.env)
    removed = [m for m in emix_json("members", "list", env=mercy.env)["members"] if not m["active"]]
    assert [m["email"] for m in removed] == ["tech@mercy.example.org"]
    # rotate: the new token works, the old one is refused
    new = emix_json("token", "rotate", env=mercy.env)["token"]
    assert emix("inbox", env=mercy.env, check=False).returncode == 1
    fresh = {**mercy.env, "EMIX_TOKEN": new}
    emix("token", "revoke", "--yes", env=fresh)  # succeeds: the new token works
    assert "refused the token" in emix("inbox", env=fresh, check=False).stderr
    audit = emix("audit", "verify", "--home", str(hub.home))
    assert audit.returncode == 0
