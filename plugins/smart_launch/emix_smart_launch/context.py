"""Where a launch's tokens live: on the hub, never in the browser.

The browser holds a random handle in a cookie; the hub's database holds the launch context
(EMR, patient, member) and the tokens encrypted with a key derived from that handle. The
database alone cannot use the tokens, the browser alone does not have them.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from datetime import timedelta
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from emix_core import PluginRecords

NAMESPACE = "smart-launch"
#: A launch's context lives as long as a hub session at most.
CONTEXT_TTL = timedelta(hours=12)


def records() -> PluginRecords:
    return PluginRecords(NAMESPACE)


def _key(handle: str) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"emix smart launch tokens"
    ).derive(handle.encode("utf-8"))


def save_transaction(transaction: dict[str, Any], ttl_seconds: int) -> None:
    records().put(f"tx:{transaction['state']}", transaction, timedelta(seconds=ttl_seconds))


def take_transaction(state: str) -> dict[str, Any] | None:
    """The pending launch of this ``state``, once: a replayed state finds nothing."""
    return records().take(f"tx:{state}")


def save_context(context: dict[str, Any], tokens: dict[str, Any], handle: str | None = None) -> str:
    """Keep a launch's context and tokens; returns the handle the browser's cookie holds."""
    handle = handle or secrets.token_urlsafe(32)
    nonce = secrets.token_bytes(12)
    sealed = AESGCM(_key(handle)).encrypt(nonce, json.dumps(tokens).encode(), b"tokens")
    records().put(
        f"ctx:{handle}",
        {**context, "tokens": base64.b64encode(nonce + sealed).decode()},
        CONTEXT_TTL,
    )
    return handle


def load_context(handle: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(context, tokens)`` of a handle, or ``None`` when unknown, expired or tampered."""
    if not handle or len(handle) > 100:
        return None
    context = records().get(f"ctx:{handle}")
    if context is None:
        return None
    raw = base64.b64decode(context.pop("tokens"))
    try:
        tokens = json.loads(AESGCM(_key(handle)).decrypt(raw[:12], raw[12:], b"tokens"))
    except (InvalidTag, ValueError):
        return None
    return context, tokens


def end_context(handle: str) -> None:
    records().delete(f"ctx:{handle}")


def expires_at(tokens: dict[str, Any]) -> float:
    """When the access token stops working (epoch seconds)."""
    if tokens.get("expires_at"):
        return float(tokens["expires_at"])
    return time.time() + float(tokens.get("expires_in") or 300)
