"""The ``[smart]`` table of the hub's ``emix.toml``: which EMRs may launch emix, and how."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from emix_core import ConfigError, hub_config_table

#: SMART v2 scopes asked by default; see :data:`V1_SCOPES` for servers that only know v1.
SCOPES = "launch openid fhirUser patient/*.rs"
#: The same access in SMART v1 syntax (``read`` instead of ``rs``).
V1_SCOPES = "launch openid fhirUser patient/*.read"
AUTH_METHODS = ("client_secret_basic", "client_secret_post", "private_key_jwt", "none")


@dataclass
class SmartSettings:
    """How emix registers as a SMART app with the EMRs it trusts."""

    #: FHIR base URLs (``iss``) allowed to launch emix; anything else is refused.
    allowed_issuers: list[str] = field(default_factory=list)
    #: For each allowed issuer, the facilities whose members it may sign in: an EMR vouches
    #: for its own clinicians, never for another facility's (an issuer without an entry
    #: signs no one in).
    issuer_facilities: dict[str, list[str]] = field(default_factory=dict)
    #: The client id the EMR gave emix.
    client_id: str = ""
    #: How emix authenticates at the token endpoint: ``client_secret_basic``,
    #: ``client_secret_post``, ``private_key_jwt`` (asymmetric, SMART's recommendation for
    #: confidential clients) or ``none`` (a public client: PKCE only).
    token_auth: str = "client_secret_basic"
    #: The secret for ``client_secret_*``; better given by ``client_secret_file``.
    client_secret: str = ""
    client_secret_file: str = ""
    #: A PEM RSA private key for ``private_key_jwt`` (its public JWK is registered in the EMR)
    #: and the key id the EMR knows it by.
    private_key_file: str = ""
    private_key_id: str = ""
    #: Scopes asked for; ``v1_scopes`` when the server says it only speaks SMART v1.
    scopes: str = SCOPES
    v1_scopes: str = V1_SCOPES
    #: Origins of the EMR pages that may show emix in an iframe (CSP frame-ancestors).
    frame_ancestors: list[str] = field(default_factory=list)
    #: The FHIR server of a standalone launch (``/smart/launch`` without ``iss``); empty:
    #: the first allowed issuer.
    standalone_issuer: str = ""
    #: Seconds allowed between the launch and the return from the EMR's sign-in.
    launch_timeout_seconds: int = 600
    #: Seconds of leeway on token times (clock skew between emix and the EMR).
    leeway_seconds: int = 60
    #: Offer "Save to the chart": a received report written to the EMR as a
    #: DocumentReference (asks ``patient/DocumentReference.c`` as well).
    write_back: bool = False

    @property
    def configured(self) -> bool:
        return bool(self.allowed_issuers and self.client_id)

    def secret(self) -> str:
        if self.client_secret_file:
            return Path(self.client_secret_file).expanduser().read_text("utf-8").strip()
        return self.client_secret

    def private_key_pem(self) -> bytes:
        return Path(self.private_key_file).expanduser().read_bytes()

    def issuer_allowed(self, iss: str) -> bool:
        return normalize(iss) in {normalize(i) for i in self.allowed_issuers}

    def facilities_of(self, iss: str) -> list[str]:
        """The facilities whose members the EMR at ``iss`` may sign in."""
        return next(
            (list(f) for i, f in self.issuer_facilities.items() if normalize(i) == normalize(iss)),
            [],
        )


def normalize(url: str) -> str:
    return url.strip().rstrip("/")


#: A host name or address of a framing origin: no wildcard, no spaces, no CSP syntax.
_HOST = re.compile(r"[a-z0-9]([a-z0-9\-.]*[a-z0-9])?|\[[0-9a-f:.]+\]")


def _check_origin(value: str) -> str:
    """One exact origin (scheme, host, port): what CSP ``frame-ancestors`` receives verbatim,
    so a wildcard or a space would let any site frame the patient's page."""
    parts = urlsplit(value.strip())
    try:
        port = parts.port
    except ValueError:
        port = None
        parts = urlsplit("")
    host = parts.netloc.rsplit(":", 1)[0] if port else parts.netloc
    if (
        parts.scheme not in ("https", "http")
        or not _HOST.fullmatch(host.lower())
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise ConfigError(
            f"[smart] frame_ancestors takes origins like https://emr.example.org, not {value!r}"
        )
    return f"{parts.scheme}://{parts.netloc.lower()}"


def load_settings() -> SmartSettings:
    """The hub's ``[smart]`` settings, checked.

    :raises ConfigError: unknown or invalid settings, with the fix.
    """
    table: dict[str, Any] = hub_config_table("smart")
    settings = SmartSettings()
    known = {f.name for f in fields(SmartSettings)}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"unknown setting [smart] {key} in emix.toml (see docs/smart.md)")
        setattr(settings, key, value)
    if not table:
        return settings
    for iss in settings.allowed_issuers:
        if urlsplit(iss).scheme not in ("https", "http") or not urlsplit(iss).hostname:
            raise ConfigError(f"[smart] allowed_issuers takes FHIR base URLs, not {iss!r}")
    if settings.token_auth not in AUTH_METHODS:
        raise ConfigError(f"[smart] token_auth is one of {', '.join(AUTH_METHODS)}")
    if settings.token_auth == "private_key_jwt" and not settings.private_key_file:
        raise ConfigError("[smart] token_auth = 'private_key_jwt' needs private_key_file")
    if settings.token_auth.startswith("client_secret") and not (
        settings.client_secret or settings.client_secret_file
    ):
        raise ConfigError(
            "[smart] a confidential client needs client_secret_file (or client_secret); "
            "a public client sets token_auth = 'none'"
        )
    settings.frame_ancestors = [_check_origin(o) for o in settings.frame_ancestors]
    _check_issuer_facilities(settings)
    return settings


def _check_issuer_facilities(settings: SmartSettings) -> None:
    table = settings.issuer_facilities
    if not isinstance(table, dict) or not all(
        isinstance(v, list) and all(isinstance(f, str) for f in v) for v in table.values()
    ):
        raise ConfigError(
            "[smart] issuer_facilities maps each FHIR base URL to facility addresses, like "
            '{ "https://emr.lakeside.example.org/fhir" = ["lakeside"] }'
        )
    for iss in table:
        if not settings.issuer_allowed(iss):
            raise ConfigError(
                f"[smart] issuer_facilities names {iss!r}, which is not in allowed_issuers"
            )
