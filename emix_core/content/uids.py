"""DICOM UIDs that emix makes, under the organisation root of the facility.

A UID emix generates (a synthetic study, a test fixture, any instance an adapter
creates) is ``<root>.<digits>`` under the root configured as ``[identifiers] uid_root``
in ``emix.toml`` (or ``EMIX_UID_ROOT``), the root the facility's organisation
registered. Without one, the UID is UUID-derived (``2.25.<UUID as an integer>``, PS3.5
B.2), which needs no registration and is still unique; emix never uses another
organisation's root (such as pydicom's example prefix).
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Sequence

from emix_core.errors import ConfigError

UID_RE = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")


def is_valid_uid(uid: str) -> bool:
    """True for a DICOM UID (PS3.5 9.1): at most 64 characters, digits and dots,
    no empty component and no leading zero in a component other than ``0``."""
    return isinstance(uid, str) and len(uid) <= 64 and UID_RE.fullmatch(uid) is not None


__all__ = ["MAX_ROOT_CHARS", "UID_RE", "check_uid_root", "is_valid_uid", "new_uid", "uid_root"]

#: Longest organisation root: at least 20 digits must follow it within 64 characters.
MAX_ROOT_CHARS = 43
_NAMESPACE = uuid.UUID("0d6f6c1e-9b8a-4f5e-8c1a-3e2b7d4f6a90")


def check_uid_root(root: str) -> str:
    """The root, checked: digits and dots, no leading zero, short enough to extend.

    :raises ConfigError: naming the rule broken.
    """
    root = root.strip().rstrip(".")
    parts = root.split(".")
    if not root or not all(p.isdigit() and (p == "0" or not p.startswith("0")) for p in parts):
        raise ConfigError(
            "[identifiers] uid_root must be a DICOM UID root: digits and dots, "
            "no component with a leading zero (e.g. 1.2.826.0.1.1234567)"
        )
    if len(root) > MAX_ROOT_CHARS:
        raise ConfigError(
            f"[identifiers] uid_root is longer than {MAX_ROOT_CHARS} characters: "
            "UIDs made under it would not be unique within DICOM's 64"
        )
    return root


def uid_root(root: str | None = None, home: str | os.PathLike[str] | None = None) -> str:
    """The root to use: the argument, else the home's ``[identifiers] uid_root`` (which
    ``EMIX_UID_ROOT`` overrides), else none (``""``: UUID-derived UIDs)."""
    if root is None:
        from emix_core.config import load_config

        root = load_config(home).identifiers.uid_root
    return check_uid_root(root) if root.strip() else ""


def new_uid(root: str | None = None, *, entropy: Sequence[str] | None = None) -> str:
    """A new DICOM UID under the organisation root.

    :param root: the organisation root; ``None`` for the configured one
        (:func:`uid_root`; read from the configuration at every call: pass the root
        when making many), ``""`` for a UUID-derived ``2.25`` UID.
    :param entropy: strings to derive the UID from (the same strings give the same
        UID, for reproducible samples); random when omitted.
    """
    if entropy is None:
        number = uuid.uuid4().int
    else:
        number = uuid.uuid5(_NAMESPACE, "\x1f".join(entropy)).int
    prefix = uid_root(root)
    if not prefix:
        return f"2.25.{number}"
    digits = str(number)[: 64 - len(prefix) - 1]
    return f"{prefix}.{digits}"
