""" "Push to my PACS": the hub stores a package's instances into the recipient facility's PACS.

The facility's administrator names one DICOMweb STOW-RS root (``https://pacs/dicom-web``)
on the administration page; a member then sends a package there from its page. Each
instance goes in its own STOW-RS request, exactly as stored (never transcoded), so memory
stays flat whatever the study's size.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests
from sqlalchemy import select

from emix_core.errors import InvalidInput
from emix_core.store.db import Destination, Facility

TIMEOUT = 60


@dataclass
class PushResult:
    """What the PACS answered, counted."""

    stored: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


def check_url(url: str) -> str:
    """A STOW-RS root must be an http(s) URL without credentials or query."""
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise InvalidInput("give the PACS's DICOMweb root, e.g. https://pacs.example.org/dicom-web")
    if parts.username or parts.password:
        raise InvalidInput("the PACS URL must not carry a user name or password")
    return url.rstrip("/")


def destination_of(session: Any, facility_address: str) -> Destination | None:
    return session.scalar(
        select(Destination)
        .join(Facility, Facility.id == Destination.facility_id)
        .where(Facility.address == facility_address)
    )


def set_destination(session: Any, facility_id: int, name: str, url: str) -> None:
    """Name the facility's PACS (one per facility); an empty URL removes it."""
    existing = session.scalar(select(Destination).where(Destination.facility_id == facility_id))
    if not url.strip():
        if existing is not None:
            session.delete(existing)
        return
    url = check_url(url)
    name = (name.strip() or urlsplit(url).hostname or "PACS")[:100]
    if existing is None:
        session.add(Destination(facility_id=facility_id, name=name, url=url))
    else:
        existing.name, existing.url = name, url


def push(content: Any, url: str) -> PushResult:
    """STOW-RS every DICOM instance of an opened package to ``url``/studies."""
    result = PushResult()
    with requests.Session() as http:
        for item in content.dicom_items():
            boundary = secrets.token_hex(16)
            body = b"".join(
                [
                    f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
                    *content.read_item(item.id),
                    f"\r\n--{boundary}--\r\n".encode(),
                ]
            )
            try:
                answer = http.post(
                    f"{url}/studies",
                    data=body,
                    headers={
                        "Content-Type": (
                            f'multipart/related; type="application/dicom"; boundary={boundary}'
                        ),
                        "Accept": "application/dicom+json",
                    },
                    timeout=TIMEOUT,
                )
            except requests.RequestException as exc:
                result.failed += 1
                result.errors.append(f"the PACS did not answer ({type(exc).__name__})")
                break
            if answer.status_code in (200, 202):
                result.stored += 1
            else:
                result.failed += 1
                result.errors.append(f"the PACS answered HTTP {answer.status_code}")
    result.errors = sorted(set(result.errors))
    return result
