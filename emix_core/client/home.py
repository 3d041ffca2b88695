"""A facility's own home (the sending and receiving side: CLI or gateway).

It keeps the facility's Ed25519 signing key, the fingerprints of other facilities'
keys pinned on first sight, and the local, hash-chained audit log.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pluggy

from emix_core.audit.chain import AuditLog
from emix_core.client.hub import HubClient
from emix_core.config import Config, load_config
from emix_core.crypto import SigningKey, create_key_file, fingerprint_of, load_key_file
from emix_core.errors import IntegrityError
from emix_core.model import AuditAction, AuditEvent, AuditOutcome
from emix_core.plugins import default_plugin_manager, hooks_for

PINS_FILE = "pinned-keys.json"


class LocalHome:
    """The state of one facility's side, in a folder.

    :param path: the folder (created 0700 if missing).
    :param pm: plugin manager; a fresh one is built when omitted.
    """

    def __init__(self, path: Path, pm: pluggy.PluginManager | None = None) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.config: Config = load_config(path)
        self.pm = pm or default_plugin_manager()
        self._signing_key: SigningKey | None = None
        self._audit_log: AuditLog | None = None

    @property
    def signing_key(self) -> SigningKey:
        """The facility's signing key, created on first use."""
        if self._signing_key is None:
            self._signing_key = SigningKey.load_or_create(
                self.path / "keys" / "facility-signing.key"
            )
        return self._signing_key

    @property
    def audit_log(self) -> AuditLog:
        if self._audit_log is None:
            key_path = self.path / "keys" / "audit.key"
            if not key_path.exists():
                create_key_file(key_path)
            self._audit_log = AuditLog(
                self.path / "audit.db", load_key_file(key_path), self.signing_key
            )
        return self._audit_log

    def audit(self, event: AuditEvent) -> None:
        """Append a local audit event to the home's chain, then hand it to forwarders.

        The chain is written first, by the core; a forwarder plugin that fails is
        logged and never stops the operation.
        """
        self.audit_log.append(event)
        hooks_for(self.pm).audit_event(event, home=str(self.path))

    def client(self, hub_url: str | None = None, token: str | None = None) -> HubClient:
        """A hub client from flags, else ``EMIX_HUB_URL``/``EMIX_TOKEN``, else config."""
        client = HubClient(
            hub_url or self.config.client.hub_url,
            token or self.config.client.token,
            verify=self.config.tls_verify,
        )
        self.keep_checkpoints_from(client)
        return client

    def keep_checkpoints_from(self, client: HubClient) -> None:
        """Keep the newest signed audit head the hub hands out with each answer, so
        ``emix audit verify --checkpoints`` on the hub detects a cut of its log."""
        state: dict[str, Any] = {"seq": -1, "key": None}
        lock = threading.Lock()

        def keep(signed: dict[str, Any]) -> None:
            seq = signed.get("document", {}).get("seq", -1)
            if not isinstance(seq, int) or seq <= state["seq"]:
                return
            if not lock.acquire(blocking=False):  # another thread keeps one right now
                return
            try:
                if state["key"] is None:
                    key = str(client.hub_info()["audit_public_key"])
                    self.pin("hub-audit", key)
                    state["key"] = key
                self.audit_log.store_checkpoint(signed, state["key"])
                state["seq"] = seq
            finally:
                lock.release()

        client.checkpoint_sink = keep

    # ------------------------------------------------------------------ pins
    def _pins(self) -> dict[str, str]:
        file = self.path / PINS_FILE
        return json.loads(file.read_text("utf-8")) if file.exists() else {}

    def _save_pins(self, pins: dict[str, str]) -> None:
        file = self.path / PINS_FILE
        temp = file.with_suffix(".tmp")
        temp.write_text(json.dumps(pins, indent=2, sort_keys=True), "utf-8")
        os.replace(temp, file)

    def pin(self, name: str, public_key_b64: str) -> str:
        """Pin a key's fingerprint on first sight; refuse loudly if it ever changes."""
        fingerprint = fingerprint_of(public_key_b64)
        pins = self._pins()
        known = pins.get(name)
        if known is None:
            pins[name] = fingerprint
            self._save_pins(pins)
        elif known != fingerprint:
            self.audit(
                AuditEvent(
                    event_type="security-alert",
                    action=AuditAction.EXECUTE,
                    outcome=AuditOutcome.SERIOUS_FAILURE,
                    actor="system",
                    detail=f"signing key of {name} changed",
                )
            )
            raise IntegrityError(
                f"the signing key of {name!r} changed (pinned {known}, hub now lists "
                f"{fingerprint}). This can mean an attack. Confirm the change with that "
                f"facility by phone, then run `emix keys forget {name}`."
            )
        return fingerprint

    def forget_pin(self, name: str) -> bool:
        pins = self._pins()
        found = pins.pop(name, None) is not None
        self._save_pins(pins)
        return found

    def facility_public_key(self, client: HubClient, address: str) -> str:
        """The public key the hub lists for a facility, checked against the pin."""
        info = client.facility_key(address)
        self.pin(f"facility:{address}", info["public_key"])
        return info["public_key"]

    def register_key(self, client: HubClient) -> dict[str, Any]:
        """Register this facility's public key with the hub (idempotent)."""
        return client.register_key(self.signing_key.public_key_b64)

    def keep_hub_checkpoint(self, client: HubClient, checkpoint: dict[str, Any]) -> None:
        """Store the hub's signed audit checkpoint in the local log (pinning the hub key)."""
        info = client.hub_info()
        self.pin("hub-audit", info["audit_public_key"])
        self.audit_log.store_checkpoint(checkpoint, info["audit_public_key"])
