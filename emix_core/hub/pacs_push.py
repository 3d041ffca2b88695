""" "Push to my PACS": the hub stores a package's instances into the recipient facility's PACS.

The facility's administrator names one PACS on the administration page: a DICOMweb
STOW-RS root (``https://pacs/dicom-web``) or a DICOM node (``AET@HOST:PORT``); a member
then sends a package there from its page. For DICOMweb each instance goes in its own
STOW-RS request, exactly as stored (never transcoded), so memory stays flat whatever the
study's size. A DICOM node is stored into by the plugin that answers
``emix_pacs_push`` (the dimse plugin: C-STORE, each file in its own transfer syntax).
Either way the hub connects only where its operator allows (``[hub] pacs_networks``,
:mod:`emix_core.hub.pacs_network`).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests
from sqlalchemy import select

from emix_core.errors import ConfigError, InvalidInput, PolicyRejected
from emix_core.hub.pacs_network import (
    Network,
    check_literal,
    guarded_session,
    resolve_allowed,
)
from emix_core.plugins import Hooks
from emix_core.store.db import Destination, Facility

TIMEOUT = 60


@dataclass
class PushResult:
    """What the PACS answered, counted."""

    stored: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


#: A DICOM node: AE title (1 to 16 characters, no backslash or control character),
#: host name or address, port.
DICOM_NODE = re.compile(r"^([^\\\x00-\x1f@]{1,16})@([A-Za-z0-9.:\[\]_-]{1,253}):([0-9]{1,5})$")


def is_dicom_node(target: str) -> bool:
    """Whether the PACS is named as a DICOM node ``AET@HOST:PORT`` (else a DICOMweb URL)."""
    return not target.startswith(("http://", "https://"))


def check_url(url: str, networks: list[Network] | None = None) -> str:
    """A PACS: a STOW-RS root (an http(s) URL without credentials or query), or a DICOM
    node ``AET@HOST:PORT``; a host written as an address the operator forbids is refused
    (:mod:`emix_core.hub.pacs_network`)."""
    url = url.strip()
    node = DICOM_NODE.match(url)
    if node:
        if not node.group(1).strip() or not 0 < int(node.group(3)) < 65536:
            raise InvalidInput("a DICOM node is AET@HOST:PORT, e.g. ORTHANC@pacs.example.org:104")
        check_literal(node.group(2), networks or [])
        return url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise InvalidInput(
            "give the PACS's DICOMweb root, e.g. https://pacs.example.org/dicom-web, "
            "or its DICOM node, e.g. ORTHANC@pacs.example.org:104"
        )
    if parts.username or parts.password:
        raise InvalidInput("the PACS URL must not carry a user name or password")
    check_literal(parts.hostname, networks or [])
    return url.rstrip("/")


def destination_of(session: Any, facility_address: str) -> Destination | None:
    return session.scalar(
        select(Destination)
        .join(Facility, Facility.id == Destination.facility_id)
        .where(Facility.address == facility_address)
    )


def set_destination(
    session: Any, facility_id: int, name: str, url: str, networks: list[Network] | None = None
) -> None:
    """Name the facility's PACS (one per facility); an empty URL removes it."""
    existing = session.scalar(select(Destination).where(Destination.facility_id == facility_id))
    if not url.strip():
        if existing is not None:
            session.delete(existing)
        return
    url = check_url(url, networks)
    default = url.split("@")[0] if is_dicom_node(url) else urlsplit(url).hostname
    name = (name.strip() or default or "PACS")[:100]
    if existing is None:
        session.add(Destination(facility_id=facility_id, name=name, url=url))
    else:
        existing.name, existing.url = name, url


def push_to(
    content: Any, target: str, hooks: Hooks, networks: list[Network] | None = None
) -> PushResult:
    """Store every DICOM instance of an opened package into the facility's PACS.

    :param networks: where the hub may connect (``[hub] pacs_networks``, parsed).
    :raises PolicyRejected: the PACS's address is not one the operator allows.
    :raises ConfigError: a DICOM node, but no installed plugin stores into one.
    :raises EmixError: the plugin could not reach the PACS at all.
    """
    if not is_dicom_node(target):
        return push(content, target, networks or [])
    node = DICOM_NODE.match(target)
    if node is None:
        raise InvalidInput("a DICOM node is AET@HOST:PORT, e.g. ORTHANC@pacs.example.org:104")
    # the plugin is handed the checked address, never the name: no second resolution
    address = resolve_allowed(node.group(2), int(node.group(3)), networks or [])
    host = f"[{address}]" if ":" in address else address
    answer = hooks.pacs_push(content, f"{node.group(1)}@{host}:{node.group(3)}")
    if answer is None:
        raise ConfigError(
            "the hub cannot store into a DICOM node: its operator must install the "
            "emix-dimse plugin (or name the PACS by its DICOMweb URL)"
        )
    return PushResult(
        stored=int(answer.get("stored", 0)),
        failed=int(answer.get("failed", 0)),
        errors=sorted({str(e)[:200] for e in answer.get("errors", [])}),
    )


def push(content: Any, url: str, networks: list[Network] | None = None) -> PushResult:
    """STOW-RS every DICOM instance of an opened package to ``url``/studies, through
    connections checked against ``networks``."""
    result = PushResult()
    with guarded_session(networks or []) as http:
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
                    # a PACS that answers a redirect is not followed elsewhere (a 307 would
                    # post the instance again, a 30x turn it into a GET of another host)
                    allow_redirects=False,
                )
            except PolicyRejected:
                raise
            except requests.RequestException as exc:
                result.failed += 1
                result.errors.append(f"the PACS did not answer ({type(exc).__name__})")
                break
            if answer.status_code in (200, 202):
                result.stored += 1
            elif answer.is_redirect:
                result.failed += 1
                result.errors.append(
                    f"the PACS answered a redirect (HTTP {answer.status_code}); name its "
                    "STOW-RS root as it is, without redirects"
                )
                break
            else:
                result.failed += 1
                result.errors.append(f"the PACS answered HTTP {answer.status_code}")
    result.errors = sorted(set(result.errors))
    return result
