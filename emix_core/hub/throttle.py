"""Throttling of failed sign-ins, per client and per credential, in the hub's database.

Only failures are counted and only failures are refused: a request with a valid token is
always served, so no one can lock a facility out by guessing from its address (or from
the proxy's address every client shares). After ``max_failed_logins`` failures within a
minute from one client, or with one credential, further failures get ``429`` instead of
``401``; the first of them raises a *Security Alert* audit event and a mail to the
hub's ``alert_email``. The counters live in the database, so every hub process sees the
same ones.

It is the hub's one throttle: the browser's sign-in links, confirmation codes and patient
access codes count their attempts here too (:func:`count_attempt`, :func:`failures`),
each under a key of its own in the one ``attempts`` table.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from emix_core.errors import EmixError
from emix_core.model import AuditAction, AuditEvent, AuditOutcome, utcnow
from emix_core.store.db import Attempt

log = logging.getLogger("emix.hub")
#: Window of the API's token and confirmation-code throttle.
WINDOW = timedelta(minutes=1)
#: Attempts older than this are forgotten (the longest window in use is 15 minutes).
KEEP = timedelta(days=1)


def failures(session: Session, key: str, window: timedelta) -> int:
    """Attempts counted under ``key`` within ``window``."""
    count = session.scalar(
        select(func.count())
        .select_from(Attempt)
        .where(Attempt.key == key[:100], Attempt.time > utcnow() - window)
    )
    return int(count or 0)


def add_attempts(session: Session, *keys: str) -> None:
    """Count one attempt under each key (and forget those older than :data:`KEEP`)."""
    now = utcnow()
    for key in keys:
        session.add(Attempt(key=key[:100], time=now))
    session.execute(delete(Attempt).where(Attempt.time < now - KEEP))
    session.flush()


def count_attempt(hub: Any, key: str, window: timedelta) -> int:
    """Count one attempt under ``key``; return how many there are within ``window``."""
    with hub.db.session() as session:
        add_attempts(session, key)
        return failures(session, key, window)


class TooManyAttempts(EmixError):
    http_status = 429
    code = "throttled"


def credential_key(secret: str) -> str:
    """What identifies a presented credential in the counters (never the secret)."""
    return hashlib.sha256(b"emix-throttle:" + secret.encode("utf-8", "replace")).hexdigest()[:32]


def record_failure(hub: Any, client: str, secret: str, what: str) -> None:
    """Count a failed sign-in; raise :class:`TooManyAttempts` once the client or the
    credential is over the limit. Returns normally below it (the caller answers 401/404).

    :param what: what failed, for the audit trail (``"sign-in"``, ``"confirmation code"``).
    """
    keys = (f"client:{client}", f"credential:{credential_key(secret)}")
    with hub.db.session() as session:
        add_attempts(session, *keys)
        by_client, by_credential = (failures(session, key, WINDOW) for key in keys)
    limit = hub.config.hub.max_failed_logins
    count = max(by_client, by_credential)
    throttled = count > limit
    hub.audit(
        AuditEvent(
            event_type="security-alert" if throttled else "user-authentication",
            action=AuditAction.EXECUTE,
            outcome=AuditOutcome.SERIOUS_FAILURE if throttled else AuditOutcome.MINOR_FAILURE,
            actor="unknown",
            source=client,
            detail=f"failed {what}; refused with 429: throttled" if throttled else f"failed {what}",
        )
    )
    if count == limit + 1:
        _alert(hub, client, count, what)
    if throttled:
        raise TooManyAttempts("too many failed attempts; wait a minute")


def _alert(hub: Any, client: str, count: int, what: str) -> None:
    """Mail the hub's administrator once per burst (no credential, no PHI)."""
    to, smtp = hub.config.hub.alert_email, hub.config.smtp
    if not to or not smtp.url:
        log.warning("client %s throttled after %d failed attempts (%s)", client, count, what)
        return
    from emix_core.hub.outbox import queue_mail

    body = (
        f"The emix hub at {hub.config.hub.public_url} throttled a client after {count} "
        f"failed attempts ({what}) within a minute.\n\n"
        f"Client address: {client}\n"
        f"Time (UTC): {utcnow():%Y-%m-%d %H:%M:%S}\n\n"
        "Valid tokens from that address are still served. If this was not one of your\n"
        "members, look for security-alert events in the hub's audit log.\n"
    )
    try:
        queue_mail(hub, to, "emix security alert: sign-ins throttled", body, "alert")
    except Exception:  # an alert that cannot be queued is still in the audit trail
        log.exception("security alert mail could not be queued")
