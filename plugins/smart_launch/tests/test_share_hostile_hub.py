"""``emix smart shares`` against a hostile or broken hub: whatever the hub answers, the
facility's side keeps only well-formed requests, runs ``emix dicomweb send`` only with
values that cannot be read as options, and fails with a clear message, never a traceback."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from emix_smart_launch.cli import MAX_SHARES, send_command, shares_command

from emix_core import is_valid_address


class HostileHub:
    """A hub on loopback that answers ``/api/v1/smart/shares`` with whatever body it is given."""

    def __init__(self) -> None:
        self.body = b'{"shares": []}'
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(hub.body)))
                self.end_headers()
                self.wfile.write(hub.body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"


@pytest.fixture
def hostile_hub() -> Iterator[HostileHub]:
    hub = HostileHub()
    yield hub
    hub.server.shutdown()
    hub.server.server_close()


def run(hub: HostileHub, home: Path, body: Any) -> Any:
    hub.body = body if isinstance(body, bytes) else json.dumps(body).encode()
    return CliRunner().invoke(
        shares_command,
        ["--pacs", "http://127.0.0.1:9/dicom-web", "--hub", hub.url, "--token", "emx_x"]
        + ["--home", str(home), "--json"],
    )


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"shares": 5},
        {"shares": "abc"},
        {"shares": {"id": "aa"}},
        b"<html>not json</html>",
        b'{"shares": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}",
        b'{"shares": ["' + b"a" * 5_000_000 + b'"]}',
    ],
    ids=["a-list", "a-number", "a-string", "an-object", "not-json", "deep-nesting", "5-mb"],
)
def test_an_answer_of_the_wrong_shape_is_a_clear_error(hostile_hub, tmp_path: Path, body):
    done = run(hostile_hub, tmp_path / "home", body)
    assert done.exit_code == 1, done.output
    assert done.exception is None or isinstance(done.exception, SystemExit), done.exception
    assert "share requests" in done.output and "Traceback" not in done.output
    assert not list((tmp_path / "home").rglob("*.json"))


def test_a_flood_of_requests_is_refused_before_anything_is_kept(hostile_hub, tmp_path: Path):
    flood = [
        {"id": f"{i:016x}", "study_uid": f"1.2.3.{i + 1}", "to": "mercy"}
        for i in range(MAX_SHARES + 1)
    ]
    done = run(hostile_hub, tmp_path / "home", {"shares": flood})
    assert done.exit_code == 1 and "share requests" in done.output
    assert not list((tmp_path / "home").rglob("*.json"))


def test_only_the_fields_of_a_request_are_kept_and_each_within_its_size(
    hostile_hub, tmp_path: Path
):
    share = {
        "id": "00000000000000aa",
        "study_uid": "1.2.3.4",
        "to": "\x1b]2;owned\x07mercy",
        "requested_by": "x" * 1_000_000,
        "padding": "y" * 1_000_000,
    }
    done = run(hostile_hub, tmp_path / "home", {"shares": [share]})
    (kept,) = (tmp_path / "home" / "smart-shares").glob("*.json")
    assert kept.stat().st_size < 4096
    assert "padding" not in kept.read_text()
    (result,) = json.loads(done.output)["shares"]
    assert result["sent"] is False and "malformed" in result["error"]
    assert "\x1b" not in done.output  # a hostile value never reaches the terminal


@pytest.mark.parametrize(
    ("to", "uid"),
    [
        ("--pacs=http://evil.example", "1.2.3"),
        ("mercy", "--pacs=http://evil.example"),
        ("mercy\n", "1.2.3"),
        ("mercy", "1.2.3\n"),
        ("-h", "1.2.3"),
        ("mercy", "1.2.*"),
    ],
)
def test_a_hostile_value_never_becomes_an_option_of_the_send(to: str, uid: str):
    assert send_command({"to": to, "study_uid": uid}, "http://pacs/dicom-web") is None


def test_the_send_names_each_value_with_its_option():
    argv = send_command({"to": "mercy", "study_uid": "1.2.3"}, "http://pacs/dicom-web")
    assert argv is not None
    assert argv[-4:] == ["--pacs=http://pacs/dicom-web", "--study=1.2.3", "--to=mercy", "--json"]


def test_an_address_with_a_trailing_newline_is_not_an_address():
    assert is_valid_address("mercy") and not is_valid_address("mercy\n")
