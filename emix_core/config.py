"""Configuration: one TOML file per home (``emix.toml``), ``EMIX_*`` variables override.

Every setting is documented once, here, and in ``docs/configuration.md``.

A *home* is a folder. A hub's home holds its keys, metadata database, audit log and
encrypted blobs. A facility's home (the sending / receiving side: CLI or gateway)
holds the facility's signing key, pinned fingerprints of other facilities and its
local audit log. One folder may be both.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emix_core.errors import ConfigError

CONFIG_NAME = "emix.toml"
_OID_RE = re.compile(r"^[0-2](\.(0|[1-9][0-9]*)){1,40}$")
DEFAULT_HOME = Path.home() / ".emix"


def resolve_home(home: str | os.PathLike[str] | None) -> Path:
    """The home folder: the argument, else ``EMIX_HOME``, else ``~/.emix``."""
    if home:
        return Path(home).expanduser().resolve()
    env = os.environ.get("EMIX_HOME")
    return Path(env).expanduser().resolve() if env else DEFAULT_HOME


@dataclass
class HubSettings:
    """Settings of a hub (the ``[hub]`` table)."""

    #: Public base URL used in links in emails (never taken from a request's Host).
    public_url: str = "http://127.0.0.1:8480"
    #: Address and port ``emix hub serve`` binds to.
    host: str = "127.0.0.1"
    port: int = 8480
    #: Blob store URL; ``file:`` (default, under the home), ``s3://BUCKET/PREFIX`` or a
    #: scheme a plugin registers. ``EMIX_BLOB_URL`` overrides.
    blob_store: str = "file:blobs"
    #: Metadata database URL (SQLAlchemy). Default: SQLite file in the home;
    #: ``postgresql://USER:PASS@HOST:PORT/DB`` at scale. ``EMIX_DATABASE_URL`` overrides.
    database_url: str = ""
    #: Database connections each worker process keeps open (PostgreSQL); 0: one per thread.
    db_pool_size: int = 0
    #: Largest single item accepted, bytes (413 above).
    max_item_bytes: int = 4 * 1024**3
    #: Largest package accepted, bytes (413 above).
    max_package_bytes: int = 64 * 1024**3
    #: Largest JSON request body, bytes.
    max_json_bytes: int = 4 * 1024**2
    #: Days a package stays available unless its sender asks for less.
    default_retention_days: int = 30
    #: How often ``hub serve`` runs the retention purge, seconds.
    purge_interval_seconds: int = 3600
    #: Days an API token stays valid.
    token_days: int = 365
    #: Audit checkpoint: the hub signs its chain head every N events (and on every seal).
    checkpoint_every: int = 100
    #: gunicorn worker processes and threads per worker.
    workers: int = 2
    threads: int = 8
    #: Failed sign-ins from one client (or with one credential) before further failures
    #: get 429 for a minute. A valid token is never refused.
    max_failed_logins: int = 10
    #: Web origins (``https://viewer.example.org``) whose pages may call the hub's DICOMweb
    #: service from a browser (CORS). Empty: none, the default.
    cors_origins: list[str] = field(default_factory=list)
    #: Networks "Send to my PACS" may connect to (``["10.20.0.0/16"]``). Empty: any
    #: address but loopback, link-local, unspecified, multicast and reserved ones.
    pacs_networks: list[str] = field(default_factory=list)
    #: Proxies in front of the hub whose ``X-Forwarded-For`` entry is trusted (0: none;
    #: the client address is the TCP peer's).
    trusted_proxy_hops: int = 0
    #: Who is mailed when a client is throttled (empty: the audit log only).
    alert_email: str = ""
    #: The key that signs audit checkpoints; keep it outside the hub's home (another
    #: disk, a mounted secret) so that whoever can edit the log cannot re-sign it.
    #: Default: ``keys/hub-signing.key`` in the home.
    audit_signing_key: str = ""
    #: A connection whose request headers take longer than this is closed, seconds.
    header_timeout_seconds: float = 10.0
    #: A request body that sends nothing for this long fails, seconds.
    body_idle_timeout_seconds: float = 60.0


@dataclass
class ClientSettings:
    """Settings of a facility's side (the ``[client]`` table): CLI and gateway."""

    hub_url: str = ""
    token: str = ""
    #: Verify the hub's TLS certificate (``true``, ``false`` or a CA bundle path).
    tls_verify: bool | str = True
    #: A CA bundle (PEM file) to trust for the hub, e.g. a hospital's private CA. Also set
    #: by ``--ca-bundle`` or ``EMIX_CA_BUNDLE``; ``REQUESTS_CA_BUNDLE`` and ``SSL_CERT_FILE``
    #: are honoured when none of these is set.
    ca_bundle: str = ""
    #: Parallel uploads and downloads.
    parallel: int = 4


@dataclass
class SmtpSettings:
    """Outgoing mail for notifications (the ``[smtp]`` table)."""

    url: str = ""  # smtp://host:port or smtps://user:password@host:port
    sender: str = "emix@localhost"


@dataclass
class IdentifierSettings:
    """How this facility names what emix makes (the ``[identifiers]`` table)."""

    #: The facility's own OID: report document ids, set ids, accession numbers, staff and
    #: visit ids in the HL7, CDA and FHIR it writes are issued under it (``<oid>.1`` ...).
    #: Empty: an OID derived from the facility's address (unique, but not registered).
    facility_oid: str = ""
    #: DICOM organisation root for the UIDs emix generates. Empty: UUID-derived ``2.25``.
    uid_root: str = ""


@dataclass
class Config:
    """The whole configuration of one home."""

    home: Path
    hub: HubSettings = field(default_factory=HubSettings)
    client: ClientSettings = field(default_factory=ClientSettings)
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    identifiers: IdentifierSettings = field(default_factory=IdentifierSettings)

    @property
    def database_url(self) -> str:
        return self.hub.database_url or f"sqlite:///{self.home / 'metadata.db'}"

    @property
    def tls_verify(self) -> bool | str:
        """What the hub client verifies TLS with: a CA bundle path, ``True`` or ``False``."""
        bundle = self.client.ca_bundle
        if bundle:
            path = Path(bundle).expanduser()
            if not path.is_file():
                raise ConfigError(f"the CA bundle {path} does not exist or is not a file")
            return str(path)
        if self.client.tls_verify is not True:
            return self.client.tls_verify
        for name in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
            if os.environ.get(name):
                return os.environ[name]
        return True

    @property
    def keys_dir(self) -> Path:
        return self.home / "keys"


def _apply(section: Any, values: dict[str, Any], table: str) -> None:
    for key, value in values.items():
        if not hasattr(section, key):
            raise ConfigError(f"unknown setting [{table}] {key} in {CONFIG_NAME}")
        setattr(section, key, value)


def load_config(home: str | os.PathLike[str] | None = None) -> Config:
    """Read ``emix.toml`` from the home (missing file: defaults), then ``EMIX_*`` overrides."""
    path = resolve_home(home)
    config = Config(home=path)
    file = path / CONFIG_NAME
    if file.exists():
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file} is not valid TOML: {exc}") from exc
        for table in ("hub", "client", "smtp", "identifiers"):
            _apply(getattr(config, table), data.get(table, {}), table)
        if data.get("client", {}).get("token") and file.stat().st_mode & 0o077:
            raise ConfigError(
                f"{file} holds an API token but others can read it; run `chmod 600 {file}`"
            )
    env = os.environ
    if env.get("EMIX_HUB_URL"):
        config.client.hub_url = env["EMIX_HUB_URL"]
    if env.get("EMIX_TOKEN"):
        config.client.token = env["EMIX_TOKEN"]
    if env.get("EMIX_CA_BUNDLE"):
        config.client.ca_bundle = env["EMIX_CA_BUNDLE"]
    if env.get("EMIX_SMTP_URL"):
        config.smtp.url = env["EMIX_SMTP_URL"]
    if env.get("EMIX_CORS_ORIGINS"):
        config.hub.cors_origins = [o.strip() for o in env["EMIX_CORS_ORIGINS"].split(",")]
    if env.get("EMIX_PACS_NETWORKS"):
        config.hub.pacs_networks = [n.strip() for n in env["EMIX_PACS_NETWORKS"].split(",")]
    if env.get("EMIX_PUBLIC_URL"):
        config.hub.public_url = env["EMIX_PUBLIC_URL"]
    if env.get("EMIX_DATABASE_URL"):
        config.hub.database_url = env["EMIX_DATABASE_URL"]
    if env.get("EMIX_BLOB_URL"):
        config.hub.blob_store = env["EMIX_BLOB_URL"]
    if env.get("EMIX_FACILITY_OID"):
        config.identifiers.facility_oid = env["EMIX_FACILITY_OID"]
    if env.get("EMIX_UID_ROOT"):
        config.identifiers.uid_root = env["EMIX_UID_ROOT"]
    _check_identifiers(config.identifiers)
    return config


def _check_identifiers(settings: IdentifierSettings) -> None:
    from emix_core.content.uids import check_uid_root

    oid = str(settings.facility_oid).strip()
    if oid and (len(oid) > 60 or not _OID_RE.match(oid)):
        raise ConfigError(
            "[identifiers] facility_oid must be an OID: at most 60 digits and dots, starting "
            "0, 1 or 2, no component with a leading zero (e.g. 1.2.276.0.7230010.3.1)"
        )
    settings.facility_oid = oid
    if str(settings.uid_root).strip():
        settings.uid_root = check_uid_root(str(settings.uid_root))


def write_config(home: Path, text: str) -> Path:
    """Write ``emix.toml`` into a home unless it exists; return its path."""
    home.mkdir(parents=True, exist_ok=True)
    file = home / CONFIG_NAME
    if not file.exists():
        file.write_text(text, encoding="utf-8")
    return file
