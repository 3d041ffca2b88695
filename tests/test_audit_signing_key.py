"""The audit checkpoint signing key from a key-provider plugin (an HSM or KMS stand-in).

Whoever can rewrite the hub's disk (the log and everything beside it) must not be able to
sign a checkpoint for a rewritten chain: the key then lives outside the hub home.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from emix_core import ConfigError, hookimpl
from emix_core.crypto import fingerprint_of, verify_document
from emix_core.hub.app import create_app
from emix_core.hub.context import init_hub_home, open_hub
from emix_core.plugins import get_plugin_manager


class Hsm:
    """Signs with a key that never touches the hub's disk (kept in this object only)."""

    def __init__(self) -> None:
        self._private = Ed25519PrivateKey.generate()
        raw = self._private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.public_key_b64 = base64.b64encode(raw).decode()
        self.fingerprint = fingerprint_of(self.public_key_b64)
        self.signed = 0

    def sign(self, data: bytes) -> str:
        self.signed += 1
        return base64.b64encode(self._private.sign(data)).decode()


class HsmPlugin:
    def __init__(self, signer: object) -> None:
        self.signer = signer

    @hookimpl
    def emix_audit_signing_key(self, home: str) -> object:
        return self.signer


def test_checkpoints_are_signed_by_the_key_a_plugin_provides(tmp_path: Path) -> None:
    hsm = Hsm()
    home = tmp_path / "hub"
    init_hub_home(home, public_url="http://127.0.0.1:8480")
    pm = get_plugin_manager()
    pm.register(HsmPlugin(hsm), name="test-hsm")
    app = create_app(home, pm=pm)
    hub = app.extensions["emix"]
    client = app.test_client()

    assert client.get("/api/v1/hub").get_json()["audit_public_key"] == hsm.public_key_b64
    checkpoint = hub.audit_log.checkpoint()
    verify_document(checkpoint, hsm.public_key_b64)  # signed by the HSM's key
    assert hsm.signed >= 2  # the start-up probe, then the checkpoint
    assert hub.audit_log.verify().ok
    private_bytes = hsm._private.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
    for path in home.rglob("*"):  # the key is nowhere on the hub's disk
        if path.is_file():
            assert private_bytes not in path.read_bytes()


def test_without_a_plugin_the_key_file_in_the_home_signs(tmp_path: Path) -> None:
    home = tmp_path / "hub"
    init_hub_home(home, public_url="http://127.0.0.1:8480")
    hub = open_hub(home, pm=get_plugin_manager())
    from emix_core.crypto import SigningKey

    assert (
        hub.signing_key.public_key_b64
        == SigningKey.load_or_create(home / "keys" / "hub-signing.key").public_key_b64
    )


class Liar(Hsm):
    """Claims one public key and signs with another (a misconfigured provider)."""

    def sign(self, data: bytes) -> str:
        return base64.b64encode(Ed25519PrivateKey.generate().sign(data)).decode()


@pytest.mark.parametrize("signer", [Liar(), object()], ids=["wrong-key", "not-a-signer"])
def test_a_provider_whose_signatures_do_not_verify_stops_the_hub(tmp_path, signer) -> None:
    home = tmp_path / "hub"
    init_hub_home(home, public_url="http://127.0.0.1:8480")
    pm = get_plugin_manager()
    pm.register(HsmPlugin(signer), name="test-hsm")
    with pytest.raises(ConfigError, match="does not sign verifiably"):
        open_hub(home, pm=pm)
