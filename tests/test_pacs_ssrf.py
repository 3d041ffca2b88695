"""A facility administrator names their PACS; the hub connects only where its operator allows.

The attacker is an administrator of one facility who types the hub's own loopback
services, a cloud metadata address, or a name resolving to them, as "my PACS".
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from emix_core.errors import InvalidInput, PolicyRejected
from emix_core.hub import pacs_push
from emix_core.hub.pacs_network import is_allowed, parse_networks
from emix_core.testing import free_port


@dataclass
class _Item:
    id: int


class _Package:
    """What ``push`` reads of an opened package: one real CT instance."""

    def __init__(self) -> None:
        self.data = Path(get_testdata_file("CT_small.dcm")).read_bytes()

    def dicom_items(self) -> Iterator[_Item]:
        yield _Item(1)

    def read_item(self, _item_id: int) -> Iterator[bytes]:
        yield self.data


class _Recorder(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length", 0))
        self.rfile.read(length)
        type(self).requests.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def internal_service() -> Iterator[int]:
    """A service on the hub's loopback that must never hear from "Send to my PACS"."""
    _Recorder.requests = []
    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield port
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "127.8.9.10", "::1", "169.254.169.254", "fe80::1", "0.0.0.0", "::",
     "::ffff:127.0.0.1", "224.0.0.1", "240.0.0.1", "not-an-address"],
)  # fmt: skip
def test_by_default_loopback_metadata_and_special_addresses_are_refused(address: str) -> None:
    assert not is_allowed(address, [])


def test_by_default_ordinary_addresses_are_allowed_and_a_list_allows_only_itself() -> None:
    assert is_allowed("10.20.1.5", []) and is_allowed("192.168.7.9", [])
    assert is_allowed("203.0.113.7", [])
    networks = parse_networks(["10.20.0.0/16", "2001:db8::/32"])
    assert is_allowed("10.20.200.1", networks) and is_allowed("2001:db8::5", networks)
    assert not is_allowed("10.21.0.1", networks)
    assert not is_allowed("127.0.0.1", networks)
    assert not is_allowed("169.254.169.254", networks)


def test_a_bad_network_entry_is_a_clear_configuration_error() -> None:
    from emix_core.errors import ConfigError

    with pytest.raises(ConfigError, match="pacs_networks: 'ten dot twenty'"):
        parse_networks(["ten dot twenty"])


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8042/dicom-web",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]:8042/dicom-web",
        "https://0.0.0.0/dicom-web",
        "ORTHANC@127.0.0.1:104",
        "ORTHANC@169.254.169.254:104",
    ],
)
def test_an_administrator_cannot_save_a_forbidden_address_as_the_pacs(url: str) -> None:
    with pytest.raises(PolicyRejected, match="pacs_networks"):
        pacs_push.check_url(url, [])
    with pytest.raises(InvalidInput):
        pacs_push.check_url("file:///etc/passwd", [])


def test_a_name_resolving_to_loopback_is_refused_on_connect_and_nothing_is_sent(
    internal_service: int,
) -> None:
    """``localhost`` is a name, so saving it passes; the connection is what is checked
    (the same holds for a name rebound to a forbidden address after it was saved)."""
    url = f"http://localhost:{internal_service}/dicom-web"
    assert pacs_push.check_url(url, []) == url
    with pytest.raises(PolicyRejected, match="pacs_networks"):
        pacs_push.push_to(_Package(), url, hooks=None, networks=[])  # type: ignore[arg-type]
    assert _Recorder.requests == []


def test_the_operator_can_allow_the_network_and_the_push_then_goes_through(
    internal_service: int,
) -> None:
    url = f"http://localhost:{internal_service}/dicom-web"
    networks = parse_networks(["127.0.0.0/8", "::1/128"])
    result = pacs_push.push_to(_Package(), url, hooks=None, networks=networks)  # type: ignore[arg-type]
    assert (result.stored, result.failed) == (1, 0)
    assert _Recorder.requests == ["/dicom-web/studies"]


class _Hooks:
    def __init__(self) -> None:
        self.targets: list[str] = []

    def pacs_push(self, _content: object, target: str) -> dict[str, int]:
        self.targets.append(target)
        return {"stored": 1, "failed": 0}


def test_a_dicom_node_named_by_a_loopback_name_never_reaches_the_plugin() -> None:
    hooks = _Hooks()
    with pytest.raises(PolicyRejected, match="pacs_networks"):
        pacs_push.push_to(_Package(), "PACS@localhost:11112", hooks, [])  # type: ignore[arg-type]
    assert hooks.targets == []


def test_the_plugin_is_handed_the_checked_address_not_the_name() -> None:
    """No second resolution in the plugin: what was checked is what it connects to."""
    hooks = _Hooks()
    networks = parse_networks(["127.0.0.0/8"])
    result = pacs_push.push_to(_Package(), "PACS@localhost:11112", hooks, networks)  # type: ignore[arg-type]
    assert result.stored == 1
    assert hooks.targets == ["PACS@127.0.0.1:11112"]
