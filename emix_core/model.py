"""Domain objects shared by the core, the hub, the gateway and plugins.

These are plain dataclasses: they carry no database or HTTP state, so a plugin can
build and inspect them without the hub running.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from typing import Any

from emix_core.errors import InvalidInput

#: A facility address: lowercase slug; ``hub`` is reserved.
ADDRESS_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
RESERVED_ADDRESSES = frozenset({"hub", "api", "static"})


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


def is_valid_address(address: str) -> bool:
    """True for a usable facility address (``a-z``, ``0-9``, ``-``; not reserved)."""
    return bool(ADDRESS_RE.fullmatch(address)) and address not in RESERVED_ADDRESSES


@dataclass(frozen=True)
class Principal:
    """Who is calling: a member of a facility, authenticated by a plugin.

    :param member_id: database id of the member.
    :param facility: address of the member's facility.
    :param email: the member's email (staff contact, not PHI).
    :param role: ``"admin"`` or ``"member"``.
    :param verified: the facility admin verified this member.
    :param confirmed: the member confirmed their identity (new-recipient confirmation).
    :param second_factor: an administrator's browser session passed the second factor
        (``False`` until it did: administrators' actions are refused until then).

    .. versionadded:: 0.2 ``second_factor``
    """

    member_id: int
    facility: str
    email: str
    role: str = "member"
    verified: bool = True
    confirmed: bool = True
    second_factor: bool = True

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass
class Recipient:
    """One addressee of a package: a whole facility, or one member of it by email."""

    facility: str
    email: str | None = None

    def __str__(self) -> str:
        return self.email or self.facility


@dataclass
class Item:
    """One file in a package (a DICOM instance, a report, an attachment).

    DICOM UIDs are PHI-adjacent: they live only in the signed (and, at the hub,
    encrypted) manifest, never in logs or paths.
    """

    id: int
    name: str
    media_type: str
    size: int
    sha256: str
    study_uid: str | None = None
    series_uid: str | None = None
    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None
    transfer_syntax_uid: str | None = None
    #: Image attributes a DICOMweb search answers with (absent in older manifests).
    instance_number: int | None = None
    rows: int | None = None
    columns: int | None = None
    bits_allocated: int | None = None
    number_of_frames: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Item:
        known: dict[str, Any] = {k: data.get(k) for k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class Package:
    """The unit of exchange, as plugins see it.

    :param id: hub-assigned identifier (hex, never derived from input).
    :param sender: address of the sending facility.
    :param recipients: who may receive it.
    :param items: manifest items (may be empty before sealing).
    :param state: ``open``, ``sealed``, ``expired`` or ``purged``.
    :param studies: per-study summary (PHI: only passed to plugins in-process).
    """

    id: str
    sender: str
    recipients: list[Recipient] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)
    state: str = "open"
    created: datetime | None = None
    expires: datetime | None = None
    studies: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total_size(self) -> int:
        return sum(item.size for item in self.items)


class AuditAction(StrEnum):
    """DICOM PS3.15 A.5 EventActionCode."""

    CREATE = "C"
    READ = "R"
    UPDATE = "U"
    DELETE = "D"
    EXECUTE = "E"


class AuditOutcome(IntEnum):
    """DICOM PS3.15 A.5 EventOutcomeIndicator."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


@dataclass(kw_only=True)
class AuditEvent:
    """One audited action, following DICOM PS3.15 A.5 event types.

    :param event_type: one of :data:`emix_core.audit.chain.EVENT_TYPES` keys, e.g.
        ``"instances-transferred"``.
    :param action: PS3.15 EventActionCode, an :class:`AuditAction`.
    :param outcome: PS3.15 EventOutcomeIndicator, an :class:`AuditOutcome`.
    :param actor: who (member email, facility address or ``"system"``).
    :param source: where from (IP address or host name).
    :param package_id: the package concerned, if any.
    :param phi: patient and study identifiers; encrypted at rest in the log.
    :param detail: free text without PHI.
    """

    event_type: str
    action: AuditAction = AuditAction.EXECUTE
    outcome: AuditOutcome = AuditOutcome.SUCCESS
    actor: str = "system"
    source: str = ""
    package_id: str | None = None
    phi: dict[str, Any] = field(default_factory=dict)
    detail: str = ""
    time: datetime = field(default_factory=utcnow)

    def __post_init__(self) -> None:
        # Refuse a code outside PS3.15 at once, where it is made, not when it is exported.
        try:
            self.action = AuditAction(self.action)
        except ValueError:
            raise InvalidInput("audit action must be one of C, R, U, D, E") from None
        try:
            self.outcome = AuditOutcome(self.outcome)
        except ValueError:
            raise InvalidInput("audit outcome must be one of 0, 4, 8, 12") from None
