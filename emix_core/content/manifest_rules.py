"""Strict shape of a signed manifest, checked by the hub before it seals a package.

A manifest is written by the sending side and read by every recipient's receiver,
gateway and destination. The hub refuses at seal anything a recipient could trip over:
wrong JSON types, UIDs that are not UIDs, duplicate item ids or SOP Instance UIDs, media
types that could smuggle a header. Messages never echo the offending value (it may be
PHI or hostile).
"""

from __future__ import annotations

import re
from typing import Any, TypeGuard

from emix_core.errors import InvalidInput
from emix_core.model import Item

UID_RE = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
MEDIA_TYPE_RE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,62}/[a-z0-9][a-z0-9!#$&^_.+-]{0,62}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
UID_FIELDS = ("study_uid", "series_uid", "sop_instance_uid", "sop_class_uid", "transfer_syntax_uid")
MAX_ITEM_ID = 1_000_000
MAX_NAME = 1024
MAX_TEXT = 1024


def is_uid(value: object) -> bool:
    """A DICOM UID: dotted decimal components without leading zeros, at most 64 chars."""
    return isinstance(value, str) and len(value) <= 64 and UID_RE.fullmatch(value) is not None


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: object) -> bool:
    return isinstance(value, str) and len(value) <= MAX_TEXT


def check_item(entry: object, index: int) -> Item:
    """One manifest item, strictly typed; :class:`InvalidInput` names only its position."""
    where = f"manifest item {index + 1}"
    if not isinstance(entry, dict):
        raise InvalidInput(f"{where} must be a JSON object")
    unknown = set(entry) - set(Item.__dataclass_fields__)
    if unknown:
        raise InvalidInput(f"{where} has unknown fields")
    item_id = entry.get("id")
    if not _is_int(item_id) or not 1 <= item_id <= MAX_ITEM_ID:
        raise InvalidInput(f"{where}: id must be an integer from 1 to {MAX_ITEM_ID}")
    name = entry.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
        raise InvalidInput(f"{where}: name must be a string of 1 to {MAX_NAME} characters")
    media_type = entry.get("media_type")
    if not isinstance(media_type, str) or not MEDIA_TYPE_RE.fullmatch(media_type):
        raise InvalidInput(f"{where}: media_type must be a plain type/subtype")
    size = entry.get("size")
    if not _is_int(size) or size < 0:
        raise InvalidInput(f"{where}: size must be a non-negative integer")
    sha256 = entry.get("sha256")
    if not isinstance(sha256, str) or not SHA256_RE.fullmatch(sha256):
        raise InvalidInput(f"{where}: sha256 must be 64 lowercase hex characters")
    for field in UID_FIELDS:
        value = entry.get(field)
        if value is not None and not is_uid(value):
            raise InvalidInput(f"{where}: {field} is not a valid DICOM UID")
    return Item.from_dict(entry)


def check_study(entry: object, index: int) -> None:
    """A per-study summary: a UID, short texts, counts, a list of modalities."""
    where = f"manifest study {index + 1}"
    if not isinstance(entry, dict):
        raise InvalidInput(f"{where} must be a JSON object")
    if "study_uid" in entry and not is_uid(entry["study_uid"]):
        raise InvalidInput(f"{where}: study_uid is not a valid DICOM UID")
    for key, value in entry.items():
        if not isinstance(key, str) or len(key) > 64:
            raise InvalidInput(f"{where} has a malformed field name")
        if key == "series_details":
            _check_series(value, where)
        elif not (_scalar(value) or _texts(value)):
            raise InvalidInput(f"{where}: {key} must be text, a number or a list of texts")


def _scalar(value: object) -> bool:
    return value is None or isinstance(value, bool | float) or _is_int(value) or _text(value)


def _texts(value: object) -> bool:
    return isinstance(value, list) and len(value) <= 64 and all(_text(v) for v in value)


def _check_series(value: object, where: str) -> None:
    """``series_details``: a list of flat objects, each with a valid ``series_uid``."""
    if not isinstance(value, list) or len(value) > 10_000:
        raise InvalidInput(f"{where}: series_details must be a list")
    for index, series in enumerate(value):
        if not isinstance(series, dict) or not all(
            isinstance(k, str) and len(k) <= 64 and _scalar(v) for k, v in series.items()
        ):
            raise InvalidInput(f"{where}: series {index + 1} must be an object of plain values")
        uid = series.get("series_uid")
        if uid is not None and not is_uid(uid):
            raise InvalidInput(f"{where}: series {index + 1} has an invalid series_uid")


def check_document(document: dict[str, Any]) -> list[Item]:
    """Every rule above, for a whole manifest document; returns its items."""
    for key in ("format", "package", "sender", "created"):
        if not _text(document.get(key)):
            raise InvalidInput(f"manifest field {key} must be a string")
    recipients = document.get("recipients", [])
    if not isinstance(recipients, list) or not all(_text(r) for r in recipients):
        raise InvalidInput("manifest recipients must be a list of strings")
    entries = document.get("items")
    if not isinstance(entries, list) or not entries:
        raise InvalidInput("a package needs at least one item")
    studies = document.get("studies", [])
    if not isinstance(studies, list):
        raise InvalidInput("manifest studies must be a list")
    for index, study in enumerate(studies):
        check_study(study, index)
    items = [check_item(entry, index) for index, entry in enumerate(entries)]
    if len({i.id for i in items}) != len(items):
        raise InvalidInput("manifest lists an item id twice")
    sops = [i.sop_instance_uid for i in items if i.sop_instance_uid]
    if len(set(sops)) != len(sops):
        raise InvalidInput("manifest lists a SOP Instance UID twice")
    return items
