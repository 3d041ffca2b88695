"""The hub's durable mail outbox: mails are queued in the request, sent in the background.

A seal (or a sign-in request, a new member, a security alert) only adds a row to the
``mail_outbox`` table, in the database every hub process shares; it never waits for the
SMTP server. A worker thread in each hub process claims due rows (a lease, so two
processes never send the same mail), sends them, and marks them sent. A failure is
retried with exponential backoff up to :data:`MAX_ATTEMPTS` times, then the mail is
marked ``failed``. Pending and failed mails show in ``/metrics``
(``emix_hub_mail_outbox``) and in the log, by number and kind, never by address.

Exactly once: a mail is sent once unless the process dies between the SMTP server's
acceptance and the row's update, in which case it is sent again when the lease expires.

At rest: a queued mail may hold a live sign-in link or confirmation code, and a patient's
address. The address and the body are sealed together with a fresh key per mail, wrapped
by the hub's key wrapper (the KEK file, or a KMS/HSM plugin), so a copy of the database
(a backup, a replica, a stolen disk) holds no usable link and no address; the
``recipient`` column keeps a masked form for the operator. The body is cleared once sent.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import weakref
from datetime import timedelta
from typing import Any

from prometheus_client import Counter
from sqlalchemy import func, or_, select, update

from emix_core import crypto
from emix_core.model import utcnow
from emix_core.store.db import OutgoingMail

log = logging.getLogger("emix.mail")

#: A mail is given up after this many failed attempts (about 1.5 hours with the backoff).
MAX_ATTEMPTS = 12
#: Longest wait between two attempts (seconds).
MAX_DELAY = 600.0
#: How long a claimed mail is reserved for the process that claimed it.
LEASE = timedelta(minutes=2)
#: How often each worker looks for due mails queued by other processes (seconds).
POLL_SECONDS = 1.0

SENT = Counter("emix_hub_mails_sent_total", "Mails accepted by the SMTP server", ["kind"])
RETRIED = Counter("emix_hub_mail_retries_total", "Mail attempts that failed; retried", ["kind"])
GAVE_UP = Counter("emix_hub_mails_failed_total", "Mails given up after every retry", ["kind"])

_workers_lock = threading.Lock()

#: Prefix of a sealed outbox body; anything else is a body queued by an older hub.
SEALED_PREFIX = "sealed:1:"
_WRAP_CONTEXT = b"emix mail outbox"
_PAYLOAD_AD = b"emix mail outbox payload"


def masked_address(address: str) -> str:
    """``j***@example.org``: enough for an operator to tell mails apart, not to write one."""
    local, _, domain = address.partition("@")
    return f"{local[:1]}***@{domain}" if domain else "***"


def seal_mail(wrapper: Any, to: str, body: str) -> str:
    """The recipient and body sealed under a fresh key wrapped by ``wrapper`` (text)."""
    key = os.urandom(crypto.KEY_SIZE)
    wrapped = wrapper.wrap(key, _WRAP_CONTEXT)
    sealed = crypto.seal_value(key, json.dumps({"to": to, "body": body}).encode(), _PAYLOAD_AD)
    packed = len(wrapped).to_bytes(2, "big") + wrapped + sealed
    return SEALED_PREFIX + base64.b64encode(packed).decode("ascii")


def open_mail(wrapper: Any, recipient: str, stored: str) -> tuple[str, str]:
    """``(to, body)`` of a stored mail; raises ``IntegrityError`` if it does not open."""
    if not stored.startswith(SEALED_PREFIX):
        return recipient, stored  # queued in plain text by an older hub
    packed = base64.b64decode(stored[len(SEALED_PREFIX) :])
    size = int.from_bytes(packed[:2], "big")
    key = wrapper.unwrap(packed[2 : 2 + size], _WRAP_CONTEXT)
    payload = json.loads(crypto.open_value(key, packed[2 + size :], _PAYLOAD_AD))
    return str(payload["to"]), str(payload["body"])


def queue_mail(hub: Any, to: str, subject: str, body: str, kind: str) -> bool:
    """Queue one plain-text mail; ``False`` (and a warning) when no SMTP is configured.

    :param kind: what the mail is (``notice``, ``confirmation``, ``sign-in``, ``alert``),
        for logs and metrics.
    """
    if not hub.config.smtp.url:
        log.warning("no SMTP configured; a %s mail cannot be sent", kind)
        return False
    now = utcnow()
    with hub.db.session() as session:
        session.add(
            OutgoingMail(
                kind=kind,
                recipient=masked_address(to)[:254],
                subject=subject[:200],
                body=seal_mail(hub.wrapper, to, body),
                state="pending",
                attempts=0,
                created=now,
                next_attempt=now,
            )
        )
    start_worker(hub).wake()
    return True


def start_worker(hub: Any) -> MailWorker:
    """The outbox worker of this process for ``hub`` (started on first use)."""
    with _workers_lock:
        worker: MailWorker | None = getattr(hub, "_mail_worker", None)
        if worker is None:
            worker = MailWorker(hub)
            hub._mail_worker = worker
            worker.start()
        return worker


class MailWorker:
    """A daemon thread sending due mails of the outbox."""

    def __init__(self, hub: Any) -> None:
        self._hub = weakref.ref(hub)
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="emix-mail", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while True:
            hub = self._hub()
            if hub is None:
                return  # the hub (an app in a test) is gone
            try:
                sent = deliver_due(hub)
            except Exception:  # the database may be away for a moment: try again later
                log.exception("mail outbox round failed")
                sent = 0
            del hub
            if not sent:
                self._wake.wait(POLL_SECONDS)
                self._wake.clear()


def deliver_due(hub: Any, limit: int = 20) -> int:
    """Send the due mails this process can claim; return how many were tried."""
    now = utcnow()
    with hub.db.session() as session:
        ids = session.scalars(
            select(OutgoingMail.id)
            .where(OutgoingMail.state == "pending", OutgoingMail.next_attempt <= now)
            .where(or_(OutgoingMail.claimed_until.is_(None), OutgoingMail.claimed_until < now))
            .order_by(OutgoingMail.id)
            .limit(limit)
        ).all()
    tried = 0
    for mail_id in ids:
        if _claim(hub, mail_id):
            _send(hub, mail_id)
            tried += 1
    return tried


def _claim(hub: Any, mail_id: int) -> bool:
    now = utcnow()
    with hub.db.session() as session:
        result = session.execute(
            update(OutgoingMail)
            .where(OutgoingMail.id == mail_id, OutgoingMail.state == "pending")
            .where(or_(OutgoingMail.claimed_until.is_(None), OutgoingMail.claimed_until < now))
            .values(claimed_until=now + LEASE)
        )
        return bool(getattr(result, "rowcount", 0) == 1)


def _send(hub: Any, mail_id: int) -> None:
    from emix_core.hub.notify import send_mail

    with hub.db.session() as session:
        mail = session.get(OutgoingMail, mail_id)
        if mail is None:
            return
        recipient, subject, stored, kind, attempts = (
            mail.recipient,
            mail.subject,
            mail.body,
            mail.kind,
            mail.attempts,
        )
    smtp = hub.config.smtp
    try:
        to, body = open_mail(hub.wrapper, recipient, stored)
        send_mail(smtp.url, smtp.sender, to, subject, body)
    except Exception as exc:  # any failure: keep the mail and try again later
        attempts += 1
        gave_up = attempts >= MAX_ATTEMPTS
        delay = min(MAX_DELAY, 2.0 ** (attempts - 1))
        with hub.db.session() as session:
            session.execute(
                update(OutgoingMail)
                .where(OutgoingMail.id == mail_id)
                .values(
                    attempts=attempts,
                    last_error=type(exc).__name__[:200],
                    next_attempt=utcnow() + timedelta(seconds=delay),
                    claimed_until=None,
                    state="failed" if gave_up else "pending",
                )
            )
        if gave_up:
            GAVE_UP.labels(kind).inc()
            log.error(
                "mail %d (%s) given up after %d attempts: %s; check the SMTP settings",
                mail_id,
                kind,
                attempts,
                type(exc).__name__,
            )
        else:
            RETRIED.labels(kind).inc()
            log.warning(
                "mail %d (%s) not sent (attempt %d: %s); next try in %.0f s",
                mail_id,
                kind,
                attempts,
                type(exc).__name__,
                delay,
            )
        return
    with hub.db.session() as session:
        session.execute(
            update(OutgoingMail)
            .where(OutgoingMail.id == mail_id)
            .values(state="sent", sent_at=utcnow(), body="", claimed_until=None)
        )
    SENT.labels(kind).inc()
    log.info("mail %d (%s) sent", mail_id, kind)


def outbox_counts(hub: Any) -> dict[str, int]:
    """Mails per state (``pending``, ``sent``, ``failed``)."""
    with hub.db.session() as session:
        rows = session.execute(
            select(OutgoingMail.state, func.count()).group_by(OutgoingMail.state)
        ).all()
    counts = {"pending": 0, "sent": 0, "failed": 0}
    counts.update({state: int(n) for state, n in rows})
    return counts


def metrics_text(hub: Any) -> bytes:
    """The outbox as Prometheus text (read from the shared database at scrape time)."""
    lines = [
        "# HELP emix_hub_mail_outbox Mails in the hub's outbox, by state",
        "# TYPE emix_hub_mail_outbox gauge",
    ]
    for state, count in sorted(outbox_counts(hub).items()):
        lines.append(f'emix_hub_mail_outbox{{state="{state}"}} {count}')
    return ("\n".join(lines) + "\n").encode()
