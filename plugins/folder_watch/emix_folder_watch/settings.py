"""Settings of a ``[[sources]]`` / ``[[destinations]]`` table with ``kind = "folder"``.

Every setting is documented once, here, and in the plugin's README.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emix_core import ConfigError, is_valid_address

if TYPE_CHECKING:
    from emix_core import Gateway


@dataclass
class OutboxSettings:
    """A watched drop folder (``[[sources]] kind = "folder"``)."""

    #: Name of this source in logs and ``emix gateway status``.
    name: str
    #: The drop folder. Without ``to``, each subfolder is named after its recipient
    #: (``outbox/<address>/``); with ``to``, everything in it goes to ``to``.
    path: Path
    #: Recipient address(es) for everything in the folder (optional).
    to: list[str] = field(default_factory=list)
    #: Where sent files move (default: ``sent`` next to the drop folder).
    sent: Path | None = None
    #: Where refused files move, each with ``<name>.error.txt`` (default: ``failed`` next to it).
    failed: Path | None = None
    #: ``"move"`` sent files to ``sent``, or ``"delete"`` them once the hub acknowledged.
    after_send: str = "move"
    #: A study is sealed when no new file of it arrived for this long (seconds).
    settle_seconds: float = 5.0
    #: A file is complete when its size and mtime did not change for this long (seconds);
    #: a file renamed from ``*.part`` or a dot-name is complete at once.
    file_settle_seconds: float = 2.0
    #: Use filesystem events (watchdog). Turn off on network shares: rescans only.
    events: bool = True
    #: Full rescan period (seconds): catches lost events. Default 30 with events, 1 without.
    rescan_seconds: float | None = None
    #: Files larger than this are refused (bytes; default 4 GiB, the hub's item limit).
    max_file_bytes: int = 4 * 1024**3
    #: Days the packages stay available on the hub (default: the hub's).
    expires_days: int | None = None
    #: Create the drop folder when it is missing. Off by default: a missing folder is
    #: refused, so that an unmounted share is not watched as an empty local folder.
    create: bool = False

    @property
    def rescan_every(self) -> float:
        if self.rescan_seconds is not None:
            return self.rescan_seconds
        return 30.0 if self.events else 1.0


@dataclass
class InboxSettings:
    """An inbox folder (``[[destinations]] kind = "folder"``): packages land in
    ``<path>/<sender-address>/<package-id>/``."""

    name: str
    #: The inbox folder.
    path: Path
    #: ``"link"`` hard-links files from the gateway's spool when on the same file system
    #: (instant, no extra space), else copies; ``"copy"`` always copies.
    mode: str = "link"
    #: Create the inbox folder when it is missing (off: a missing folder is refused).
    create: bool = False


def _parse(cls: type, raw: dict[str, Any], gateway: Gateway, paths: tuple[str, ...]) -> Any:
    known = {f.name for f in fields(cls)} | {"kind"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"unknown setting {unknown[0]!r} in the folder table {raw.get('name')!r} of "
            f"{gateway.config_path}; known: {', '.join(sorted(known - {'kind'}))}"
        )
    if not raw.get("path"):
        raise ConfigError(f'the folder table {raw.get("name")!r} needs path = "..."')
    values = {k: v for k, v in raw.items() if k != "kind"}
    for key in paths:
        if values.get(key) is not None:
            values[key] = gateway.resolve_path(values[key])
    return cls(**values)


def _positive(value: Any, what: str, *, allow_zero: bool = False) -> float:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or value < 0
        or (value == 0 and not allow_zero)
    ):
        raise ConfigError(f"{what} must be a positive number")
    return float(value)


def require_folder(path: Path, create: bool, table: str, gateway: Gateway) -> None:
    """Refuse a missing folder unless the table says ``create = true``."""
    if path.is_dir():
        return
    if create:
        path.mkdir(parents=True, exist_ok=True)
        return
    raise ConfigError(
        f"the folder {path} of the {table} table in {gateway.config_path} does not exist "
        "(an unmounted share?); mount or create it, or set create = true in that table"
    )


def outbox_settings(raw: dict[str, Any], gateway: Gateway) -> OutboxSettings:
    """Validate a ``[[sources]]`` folder table.

    :raises ConfigError: unknown setting, bad value, or ``sent``/``failed`` inside the folder.
    """
    s: OutboxSettings = _parse(OutboxSettings, raw, gateway, ("path", "sent", "failed"))
    s.sent = s.sent or s.path.parent / "sent"
    s.failed = s.failed or s.path.parent / "failed"
    if isinstance(s.to, str):
        s.to = [s.to]
    if not isinstance(s.to, list) or not all(
        isinstance(a, str) and is_valid_address(a) for a in s.to
    ):
        raise ConfigError(
            f"to = {s.to!r} in source {s.name!r}: give facility addresses (lowercase "
            "letters, digits, '-')"
        )
    if s.after_send not in ("move", "delete"):
        raise ConfigError(f'after_send must be "move" or "delete" in source {s.name!r}')
    s.settle_seconds = _positive(s.settle_seconds, "settle_seconds", allow_zero=True)
    s.file_settle_seconds = _positive(s.file_settle_seconds, "file_settle_seconds", allow_zero=True)
    if s.rescan_seconds is not None:
        s.rescan_seconds = _positive(s.rescan_seconds, "rescan_seconds")
    if not isinstance(s.max_file_bytes, int) or s.max_file_bytes <= 0:
        raise ConfigError("max_file_bytes must be a positive whole number of bytes")
    for label, other in (("sent", s.sent), ("failed", s.failed)):
        if other == s.path or other.is_relative_to(s.path) or s.path.is_relative_to(other):
            raise ConfigError(
                f"the {label} folder {other} must be outside the drop folder {s.path} "
                "(otherwise sent or failed files would be picked up again)"
            )
    return s


def inbox_settings(raw: dict[str, Any], gateway: Gateway) -> InboxSettings:
    """Validate a ``[[destinations]]`` folder table."""
    s: InboxSettings = _parse(InboxSettings, raw, gateway, ("path",))
    if s.mode not in ("link", "copy"):
        raise ConfigError(f'mode must be "link" or "copy" in destination {s.name!r}')
    return s
