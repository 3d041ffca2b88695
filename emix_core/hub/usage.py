"""Usage per facility per month: packages and bytes sent and received (eMix billed per transfer).

A package counts in the month it was sealed (when it became a transfer), for its sender
and for every facility it was addressed to, whether or not it was downloaded yet.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from emix_core.errors import InvalidInput
from emix_core.store.db import Facility, PackageRecipient, PackageRow

MONTH_RE = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")


def month_bounds(month: str) -> tuple[datetime, datetime]:
    """``2026-03`` → [2026-03-01, 2026-04-01) in UTC."""
    match = MONTH_RE.match(month or "")
    if not match:
        raise InvalidInput("give the month as YYYY-MM, e.g. --month 2026-03")
    year, number = int(match.group(1)), int(match.group(2))
    start = datetime(year, number, 1, tzinfo=UTC)
    end = datetime(year + number // 12, number % 12 + 1, 1, tzinfo=UTC)
    return start, end


def monthly_usage(hub: Any, month: str) -> dict[str, Any]:
    """``{"month", "facilities": [{"address", "packages_sent", "bytes_sent", ...}]}``."""
    start, end = month_bounds(month)
    naive = (start.replace(tzinfo=None), end.replace(tzinfo=None))
    with hub.db.session() as session:
        facilities = {f.id: f.address for f in session.scalars(select(Facility))}
        usage = {
            fid: {
                "address": address,
                "packages_sent": 0,
                "bytes_sent": 0,
                "packages_received": 0,
                "bytes_received": 0,
            }
            for fid, address in facilities.items()
        }
        bounds = naive if hub.db.engine.dialect.name == "sqlite" else (start, end)
        sealed = session.scalars(
            select(PackageRow).where(
                PackageRow.sealed_at.is_not(None),
                PackageRow.sealed_at >= bounds[0],
                PackageRow.sealed_at < bounds[1],
            )
        ).all()
        for row in sealed:
            sender = usage[row.sender_facility_id]
            sender["packages_sent"] += 1
            sender["bytes_sent"] += row.total_size
            receivers = set(
                session.scalars(
                    select(PackageRecipient.facility_id).where(
                        PackageRecipient.package_id == row.id
                    )
                )
            )
            for fid in receivers:
                usage[fid]["packages_received"] += 1
                usage[fid]["bytes_received"] += row.total_size
    return {"month": month, "facilities": sorted(usage.values(), key=lambda f: f["address"])}
