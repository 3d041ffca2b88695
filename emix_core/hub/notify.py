"""Built-in notifier (plugin ``emix.smtp``): mails recipients that a package is waiting.

Mails go through the durable outbox (:mod:`emix_core.hub.outbox`): the request that seals
a package only queues them, so a slow or unreachable SMTP server never slows it down.

The mail carries no PHI: no patient, no study, no sender's file names; only that a
package is waiting and the link to it, built from the hub's configured public URL.
"""

from __future__ import annotations

import logging
import smtplib
from email.message import EmailMessage
from typing import Any
from urllib.parse import unquote, urlsplit

from flask import current_app, has_app_context

from emix_core.errors import ConfigError
from emix_core.model import Package, Recipient
from emix_core.plugins import hookimpl

log = logging.getLogger("emix.notify")


def _smtp_settings() -> Any:
    if not has_app_context():
        return None
    return current_app.extensions["emix"].config.smtp


def send_mail(smtp_url: str, sender: str, to: str, subject: str, body: str) -> None:
    """Send one plain-text mail through ``smtp://host:port`` or ``smtps://user:pw@host:port``."""
    parts = urlsplit(smtp_url)
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise ConfigError("smtp url must look like smtp://host:port or smtps://host:port")
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message.set_content(body)
    port = parts.port or (465 if parts.scheme == "smtps" else 25)
    client_cls = smtplib.SMTP_SSL if parts.scheme == "smtps" else smtplib.SMTP
    with client_cls(parts.hostname, port, timeout=30) as client:
        if parts.username:
            client.login(unquote(parts.username), unquote(parts.password or ""))
        client.send_message(message)


@hookimpl(trylast=True)
def emix_notify(recipient: Recipient, email: str, package: Package, link: str) -> bool | None:
    smtp = _smtp_settings()
    if smtp is None or not smtp.url:
        log.info("no SMTP configured; package %s waiting (notice not mailed)", package.id)
        return None
    from emix_core.hub.outbox import queue_mail

    body = (
        "Hello,\n\n"
        "A package of medical images or reports has been shared with you through emix.\n"
        f"It will be available until {package.expires:%Y-%m-%d} (UTC).\n\n"
        f"Open it here: {link}\n\n"
        "For your patients' privacy this message contains no patient information.\n"
        "If you did not expect it, tell your facility's emix administrator.\n"
    )
    hub = current_app.extensions["emix"]
    queue_mail(hub, email, "A package is waiting for you on emix", body, "notice")
    log.info("notice queued for package %s", package.id)
    return True


def send_confirmation(hub: Any, email: str, code: str) -> None:
    """Mail a new member the one-time code that confirms their identity."""
    smtp = hub.config.smtp
    if not smtp.url:
        log.warning("no SMTP configured; a new member cannot receive a confirmation code")
        return
    body = (
        "Your facility administrator added you to emix.\n\n"
        "Confirm your identity once: run\n\n"
        f"    emix member confirm --hub {hub.config.hub.public_url}\n\n"
        "and enter this code when asked:\n\n"
        f"    {code}\n\n"
        "The code works once, within 72 hours. If you did not expect this, ignore this "
        "message.\n"
    )
    from emix_core.hub.outbox import queue_mail

    queue_mail(hub, email, "Confirm your emix account", body, "confirmation")
