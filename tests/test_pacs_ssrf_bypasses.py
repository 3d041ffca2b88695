"""Bypasses of the "Send to my PACS" allowlist: other spellings of forbidden addresses
(IPv6 forms that carry an IPv4 address, decimal, octal and hex IPv4), and a PACS that
answers a redirect towards another host."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from emix_core.errors import PolicyRejected
from emix_core.hub import pacs_push
from emix_core.hub.pacs_network import is_allowed, parse_networks


class _Item:
    id = 1


class _Package:
    def dicom_items(self) -> Iterator[_Item]:
        yield _Item()

    def read_item(self, _item_id: int) -> Iterator[bytes]:
        yield Path(get_testdata_file("CT_small.dcm")).read_bytes()


@pytest.mark.parametrize(
    "address",
    [
        "::127.0.0.1",  # IPv4-compatible
        "::ffff:127.0.0.1",  # IPv4-mapped
        "::ffff:169.254.169.254",
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of the metadata address
        "64:ff9b:1::a9fe:a9fe",  # local-use NAT64
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
        "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo towards 127.0.0.1
        "::1",
        "::",
        "fe80::1%lo",
        "0.0.0.0",
        "224.0.0.1",
    ],
)
def test_an_ipv6_form_of_a_forbidden_ipv4_address_is_forbidden_too(address: str) -> None:
    assert not is_allowed(address, [])


def test_public_addresses_stay_allowed() -> None:
    for address in ("10.20.0.5", "192.0.2.10", "2001:db8::10", "2a00:1450:4001:80b::200e"):
        assert is_allowed(address, []), address


class _Server(http.server.ThreadingHTTPServer):
    def __init__(self, status: int, location: str = "") -> None:
        self.heard: list[str] = []
        self.status, self.location = status, location
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.heard.append(f"{self.command} {self.path}")
                self.send_response(server.status)
                if server.location:
                    self.send_header("Location", server.location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_GET = _answer  # noqa: N815

            def log_message(self, *_args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_of_the_pacs_is_not_followed(status: int) -> None:
    """The PACS the administrator named answers a redirect: the instance is not posted (nor
    a GET made) anywhere else, even within the allowed networks; the push reports it."""
    elsewhere = _Server(200)
    pacs = _Server(status, f"{elsewhere.url}/dicom-web/studies")
    try:
        networks = parse_networks(["127.0.0.1/32"])
        result = pacs_push.push_to(_Package(), f"{pacs.url}/dicom-web", None, networks)  # type: ignore[arg-type]
        assert (result.stored, result.failed) == (0, 1)
        assert any("redirect" in e for e in result.errors), result.errors
        assert pacs.heard == ["POST /dicom-web/studies"]
        assert elsewhere.heard == []
    finally:
        for server in (pacs, elsewhere):
            server.shutdown()
            server.server_close()


@pytest.mark.parametrize(
    "host", ["2130706433", "0x7f.1", "0177.0.0.1", "127.1", "0x7f000001", "017700000001"]
)
def test_decimal_octal_and_hex_spellings_of_loopback_are_refused_on_connect(host: str) -> None:
    """The C library reads these as 127.0.0.1: the address actually connected to is what
    is checked, so a service listening there hears nothing."""
    internal = _Server(200)
    port = internal.server_address[1]
    try:
        with pytest.raises(PolicyRejected, match="pacs_networks"):
            pacs_push.push_to(_Package(), f"http://{host}:{port}/dicom-web", None, [])  # type: ignore[arg-type]
        with pytest.raises(PolicyRejected, match="pacs_networks"):
            pacs_push.push_to(_Package(), f"PACS@{host}:{port}", None, [])  # type: ignore[arg-type]
        assert internal.heard == []
    finally:
        internal.shutdown()
        internal.server_close()
