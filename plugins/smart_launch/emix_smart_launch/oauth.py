"""The OAuth 2 / OpenID Connect side of a SMART launch: discovery, the authorization request
(PKCE S256, ``state``, ``aud``, ``nonce``), the code exchange, refresh, and the id_token
checked against the EMR's JWKS. authlib does the protocol; joserfc the signatures.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import requests
from authlib.integrations.requests_client import OAuth2Session
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, RSAKey

from emix_core import LaunchRejected

from .settings import SmartSettings, normalize

log = logging.getLogger("emix.smart")

TIMEOUT = 10
#: Largest discovery document or JWKS accepted, bytes.
MAX_DOCUMENT = 256 * 1024
#: id_token signature algorithms accepted (SMART requires RS256 support).
ID_TOKEN_ALGORITHMS = ["RS256"]


@dataclass
class Server:
    """What an EMR's ``.well-known/smart-configuration`` says (the parts emix uses)."""

    iss: str
    authorization_endpoint: str
    token_endpoint: str
    issuer: str
    jwks_uri: str
    capabilities: list[str]
    scopes_supported: list[str]

    def speaks_v2_scopes(self) -> bool:
        """SMART v2 scopes (``patient/*.rs``) unless the server says it knows only v1."""
        if "permission-v2" in self.capabilities:
            return True
        if "permission-v1" in self.capabilities:
            return False
        return not any(s.endswith(".read") for s in self.scopes_supported)


def _get_json(url: str, what: str) -> dict[str, Any]:
    try:
        answer = requests.get(
            url, headers={"Accept": "application/json"}, timeout=TIMEOUT, stream=True
        )
        body = answer.raw.read(MAX_DOCUMENT + 1, decode_content=True)
    except requests.RequestException as exc:
        raise LaunchRejected(
            f"the EMR's {what} could not be read ({type(exc).__name__}); check that the hub "
            "can reach the EMR's FHIR server"
        ) from exc
    if answer.status_code != 200 or len(body) > MAX_DOCUMENT:
        raise LaunchRejected(f"the EMR's {what} answered HTTP {answer.status_code}")
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise LaunchRejected(f"the EMR's {what} is not JSON") from exc
    if not isinstance(data, dict):
        raise LaunchRejected(f"the EMR's {what} is not a JSON object")
    return data


def discover(iss: str) -> Server:
    """Read the server's SMART configuration (SMART App Launch 2.x, discovery)."""
    doc = _get_json(f"{normalize(iss)}/.well-known/smart-configuration", "SMART configuration")
    missing = [k for k in ("authorization_endpoint", "token_endpoint") if not doc.get(k)]
    if missing:
        raise LaunchRejected(f"the EMR's SMART configuration lacks {', '.join(missing)}")
    return Server(
        iss=normalize(iss),
        authorization_endpoint=str(doc["authorization_endpoint"]),
        token_endpoint=str(doc["token_endpoint"]),
        issuer=str(doc.get("issuer") or normalize(iss)),
        jwks_uri=str(doc.get("jwks_uri") or ""),
        capabilities=[str(c) for c in doc.get("capabilities") or []],
        scopes_supported=[str(s) for s in doc.get("scopes_supported") or []],
    )


def scopes_for(settings: SmartSettings, server: Server, standalone: bool) -> str:
    v2 = server.speaks_v2_scopes()
    scopes = settings.scopes if v2 else settings.v1_scopes
    if settings.write_back:
        scopes += " patient/DocumentReference.c" if v2 else " patient/DocumentReference.write"
    if standalone:  # no EMR context to join: ask the server's patient picker instead
        scopes = " ".join("launch/patient" if s == "launch" else s for s in scopes.split())
    return scopes


def _session(settings: SmartSettings, server: Server, redirect_uri: str, scope: str = "") -> Any:
    method = settings.token_auth
    secret: Any = None
    if method.startswith("client_secret"):
        secret = settings.secret()
    elif method == "private_key_jwt":
        secret = RSAKey.import_key(
            settings.private_key_pem(),
            parameters={"kid": settings.private_key_id} if settings.private_key_id else None,
        )
    session = OAuth2Session(
        settings.client_id,
        secret,
        token_endpoint_auth_method=method,
        scope=scope or None,
        redirect_uri=redirect_uri,
        code_challenge_method="S256",
        default_timeout=TIMEOUT,
    )
    if method == "private_key_jwt":
        headers = {"kid": settings.private_key_id} if settings.private_key_id else None
        # SMART asks for RS384 (or ES384) client assertions
        session.register_client_auth_method(
            PrivateKeyJWT(server.token_endpoint, headers=headers, alg="RS384")
        )
    return session


def authorization_url(
    settings: SmartSettings,
    server: Server,
    redirect_uri: str,
    *,
    launch: str | None,
    standalone: bool,
) -> tuple[str, dict[str, Any]]:
    """The URL to send the browser to, and the transaction to keep server-side."""
    state = secrets.token_urlsafe(32)
    verifier = secrets.token_urlsafe(64)
    nonce = secrets.token_urlsafe(24)
    scope = scopes_for(settings, server, standalone)
    extra: dict[str, str] = {"aud": server.iss, "nonce": nonce}
    if launch:
        extra["launch"] = launch
    url, _ = _session(settings, server, redirect_uri, scope).create_authorization_url(
        server.authorization_endpoint, state=state, code_verifier=verifier, **extra
    )
    transaction = {
        "state": state,
        "verifier": verifier,
        "nonce": nonce,
        "iss": server.iss,
        "scope": scope,
        "started": time.time(),
    }
    return url, transaction


def exchange_code(
    settings: SmartSettings, server: Server, redirect_uri: str, code: str, verifier: str
) -> dict[str, Any]:
    """Trade the authorization code (with its PKCE verifier) for tokens."""
    session = _session(settings, server, redirect_uri)
    try:
        token = session.fetch_token(
            server.token_endpoint,
            grant_type="authorization_code",
            code=code,
            code_verifier=verifier,
        )
    except Exception as exc:  # authlib raises OAuthError; requests its own
        raise LaunchRejected(
            f"the EMR did not exchange the sign-in code ({_reason(exc)}); launch emix again "
            "from the chart"
        ) from exc
    return dict(token)


def refresh(settings: SmartSettings, server: Server, refresh_token: str) -> dict[str, Any]:
    """New tokens for an expired access token (the EMR may rotate the refresh token)."""
    session = _session(settings, server, "")
    try:
        token = session.refresh_token(server.token_endpoint, refresh_token=refresh_token)
    except Exception as exc:
        raise LaunchRejected(
            f"the EMR did not renew access ({_reason(exc)}); launch emix again from the chart"
        ) from exc
    return dict(token)


def _reason(exc: Exception) -> str:
    error = getattr(exc, "error", None)
    return str(error) if error else type(exc).__name__


def verify_id_token(
    settings: SmartSettings, server: Server, id_token: str, nonce: str
) -> dict[str, Any]:
    """The id_token's claims once its signature (JWKS, RS256), issuer, audience, expiry and
    nonce check out.

    :raises LaunchRejected: anything that does not.
    """
    if not server.jwks_uri:
        raise LaunchRejected("the EMR's SMART configuration names no jwks_uri to check tokens")
    try:
        keys = KeySet.import_key_set(_get_json(server.jwks_uri, "key set (JWKS)"))  # type: ignore[arg-type]
        token = jwt.decode(id_token, keys, algorithms=ID_TOKEN_ALGORITHMS)
    except (JoseError, ValueError, TypeError) as exc:
        raise LaunchRejected(
            f"the EMR's id_token did not verify against its key set ({type(exc).__name__})"
        ) from exc
    registry = jwt.JWTClaimsRegistry(
        leeway=settings.leeway_seconds,
        iss={"essential": True, "value": server.issuer},
        aud={"essential": True, "value": settings.client_id},
        exp={"essential": True},
        sub={"essential": True},
        nonce={"essential": True, "value": nonce},
    )
    try:
        registry.validate(token.claims)
    except JoseError as exc:
        raise LaunchRejected(
            f"the EMR's id_token was refused: {exc.error} ({exc.description or 'claims'})"
        ) from exc
    return dict(token.claims)
