"""HL7 timestamps (``YYYYMMDDHHMMSS+ZZZZ``), shared by HL7 v2 (TS/DTM) and CDA (TS)."""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone

__all__ = ["format_date", "format_ts", "parse_date", "parse_ts"]

_TS_RE = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.\d{1,6})?([+-]\d{4})?$")


def format_ts(value: datetime | None) -> str:
    """``20240131143000+0100``; empty for ``None``."""
    return value.strftime("%Y%m%d%H%M%S%z") if value else ""


def format_date(value: date | None) -> str:
    """``20240131``; empty for ``None``."""
    return value.strftime("%Y%m%d") if value else ""


def parse_ts(value: str) -> datetime | None:
    """A timestamp of any precision (missing parts are the start of the period).

    :return: ``None`` when the value is empty or not a timestamp.
    """
    match = _TS_RE.match(value.strip())
    if not match:
        return None
    year, month, day, hour, minute, second, offset = match.groups()
    tz = None
    if offset:
        sign = 1 if offset[0] == "+" else -1
        tz = timezone(sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[3:5])))
    try:
        return datetime(
            int(year),
            int(month or 1),
            int(day or 1),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            tzinfo=tz,
        )
    except ValueError:
        return None


def parse_date(value: str) -> date | None:
    """The date part of a timestamp; ``None`` when absent or invalid."""
    value = value.strip()
    parsed = parse_ts(value[:8]) if len(value) >= 8 else None
    return parsed.date() if parsed else None
