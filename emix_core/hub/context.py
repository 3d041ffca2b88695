"""Everything a hub process holds: config, plugin manager, database, blobs, keys, audit."""

from __future__ import annotations

import logging
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pluggy

from emix_core.audit.chain import AuditLog
from emix_core.config import CONFIG_NAME, Config, load_config, write_config
from emix_core.crypto import SigningKey, check_signer, create_key_file, load_key_file
from emix_core.errors import ConfigError
from emix_core.hub.keycheck import check_wrapper, refuse_new_kek_over_wrapped_keys
from emix_core.model import AuditAction, AuditEvent
from emix_core.plugins import default_plugin_manager, hooks_for
from emix_core.store.blobs import BlobStore, open_blob_store
from emix_core.store.db import Database

log = logging.getLogger("emix.hub")

HUB_CONFIG_TEMPLATE = """\
# emix hub configuration. Every setting is described in docs/configuration.md.
[hub]
# Base URL that recipients reach; links in emails are built from it, never from a request.
public_url = "{public_url}"
host = "127.0.0.1"
port = {port}
default_retention_days = 30

[smtp]
# smtp://host:port (EMIX_SMTP_URL overrides). Empty: notifications are logged, not mailed.
url = ""
sender = "emix@localhost"
"""


def init_hub_home(
    home: Path,
    *,
    public_url: str | None = None,
    port: int = 8480,
    database_url: str | None = None,
    blob_url: str | None = None,
) -> Config:
    """Create a hub's home: config, key-encryption key, audit key, signing key, database.

    :param database_url: metadata database (default: SQLite in the home), written to
        the config; ``postgresql://USER:PASS@HOST:PORT/DB`` for several instances.
    :param blob_url: blob store (default: ``file:blobs``), e.g. ``s3://BUCKET/PREFIX``.

    Safe to run twice: existing keys and data are kept. A facility's home (it holds a
    facility signing key or ``[client]`` settings) is refused: a hub needs a home of its own.
    """
    _refuse_facility_home(home)
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    home.chmod(0o700)
    text = HUB_CONFIG_TEMPLATE.format(
        public_url=public_url or f"http://127.0.0.1:{port}", port=port
    )
    extra = ""
    if database_url:
        extra += f"database_url = {_toml_string(database_url)}\n"
    if blob_url:
        extra += f"blob_store = {_toml_string(blob_url)}\n"
    write_config(
        home,
        text.replace("default_retention_days = 30\n", f"{extra}default_retention_days = 30\n", 1),
    )
    keys = home / "keys"
    refuse_new_kek_over_wrapped_keys(home, load_config(home).database_url)
    for name in ("kek.key", "audit.key"):
        if not (keys / name).exists():
            create_key_file(keys / name)
    SigningKey.load_or_create(keys / "hub-signing.key")
    config = load_config(home)
    db = Database(config.database_url, pool_size=1)
    try:
        db.create_all()
    finally:
        db.engine.dispose()
    (home / "logs").mkdir(exist_ok=True, mode=0o700)
    return config


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _refuse_facility_home(home: Path) -> None:
    file = home / CONFIG_NAME
    client_settings: dict[str, object] = {}
    if file.exists():
        try:
            client_settings = tomllib.loads(file.read_text("utf-8")).get("client", {})
        except (tomllib.TOMLDecodeError, UnicodeDecodeError):
            client_settings = {}
    if (home / "keys" / "facility-signing.key").exists() or any(
        client_settings.get(k) for k in ("hub_url", "token")
    ):
        raise ConfigError(
            f"{home} is a facility's home (it holds a facility signing key or [client] "
            "settings), not a hub's; a hub needs a folder of its own: pass --home with a "
            "new folder"
        )


@dataclass
class Hub:
    """The live state of one hub process."""

    config: Config
    pm: pluggy.PluginManager
    db: Database
    blobs: BlobStore
    wrapper: Any
    audit_log: AuditLog
    signing_key: Any  # SigningKey, or the signer a key-provider plugin gave
    instance: str

    def audit(self, event: AuditEvent) -> None:
        """Append an audit event to the hub's chain, then hand it to forwarder plugins.

        The chain is written first and by the core itself, so no plugin can starve it;
        a forwarder that fails is logged and the operation goes on.
        """
        self.audit_log.append(event)
        hooks_for(self.pm).audit_event(event, home=str(self.config.home))
        if self.audit_log.head()[0] % max(self.config.hub.checkpoint_every, 1) == 0:
            self.audit_log.checkpoint()

    def audit_operator(
        self, action: AuditAction, detail: str, *, package_id: str | None = None
    ) -> None:
        """Audit what the hub operator did on this machine's command line (a PS3.15
        *Security Alert*: facilities, keys, legal holds, sign-in links)."""
        self.audit(
            AuditEvent(
                event_type="security-alert",
                action=action,
                actor="hub-operator",
                source="local",
                package_id=package_id,
                detail=detail,
            )
        )


def open_hub(home: str | Path | None = None, pm: pluggy.PluginManager | None = None) -> Hub:
    """Open an initialised hub home (``emix hub init`` made it)."""
    config = load_config(home)
    if not (config.home / CONFIG_NAME).exists() or not (config.keys_dir / "kek.key").exists():
        _refuse_facility_home(config.home)
    if not (config.home / CONFIG_NAME).exists():  # a hub home missing its KEK: see check_wrapper
        raise ConfigError(
            f"{config.home} is not a hub home; create it with `emix hub init --home {config.home}`"
        )
    from emix_core.hub.pacs_network import parse_networks

    parse_networks(config.hub.pacs_networks)  # a bad entry stops the hub at start
    pm = pm or default_plugin_manager()
    db = Database(config.database_url, pool_size=config.hub.db_pool_size or config.hub.threads)
    db.create_all()
    wrapper = hooks_for(pm).key_wrapper(str(config.home))
    if wrapper is None:
        raise ConfigError("no key wrapper plugin answered; the built-in emix.keyfile is disabled")
    check_wrapper(wrapper, db)
    signing_key = hooks_for(pm).audit_signing_key(str(config.home))
    if signing_key is None:
        raise ConfigError("no audit signing key provider answered; emix.keyfile is disabled")
    check_signer(signing_key)
    # SQLite hub: the chain keeps its own file; shared database: its tables there.
    audit_log = AuditLog(
        config.home / "audit.db" if db.is_sqlite else db.engine,
        load_key_file(config.keys_dir / "audit.key"),
        signing_key,
    )
    blobs = open_blob_store(pm, config.hub.blob_store, config.home)
    return Hub(
        config=config,
        pm=pm,
        db=db,
        blobs=blobs,
        wrapper=wrapper,
        audit_log=audit_log,
        signing_key=signing_key,
        instance=secrets.token_hex(4),
    )
