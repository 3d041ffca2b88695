"""Gateway source of kind ``dimse``: a C-STORE SCP whose studies go out through the hub.

``emix dimse listen`` runs the same source in a gateway of its own. Instances are kept
in a spool as they arrive (:mod:`emix_dimse.spool`); a sender thread turns each study
into one package once it is due — quiet for ``settle_seconds``, or (``send_on =
"association-end"``) no longer added to by an open association — exactly once across
crashes.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emix_core import (
    ConfigError,
    EmixError,
    NotFoundError,
    is_valid_address,
    log_event,
    retry_delay,
)
from emix_dimse.listener import Listener, ListenerSettings, Router, parse_routes
from emix_dimse.peers import check_ae_title, parse_allow
from emix_dimse.spool import Batch, Spool

if TYPE_CHECKING:
    from emix_core import Gateway

__all__ = ["DimseSource", "SOURCE_SETTINGS", "tls_server_context"]

log = logging.getLogger("emix.dimse")

#: How often the sender looks for due studies (seconds).
TICK = 0.2
SEND_ON = ("settled", "association-end")

#: Every setting of a ``[[sources]]`` table of kind ``dimse``.
SOURCE_SETTINGS = {
    "kind": '"dimse"',
    "name": "name shown in logs and status",
    "ae_title": "the listener's AE title (required)",
    "port": "TCP port to listen on (required)",
    "host": 'address to listen on (default "0.0.0.0": every interface)',
    "allow": 'accepted callers, "AET" or "AET@HOST" (default: any caller, with a warning)',
    "to": "recipient address(es) for what no route claims",
    "routes": "[[sources.routes]] tables: to, calling_ae (pattern), match (keyword = pattern)",
    "send_on": '"settled" (default) or "association-end"',
    "settle_seconds": "send a study once no instance of it arrived for this long (default 5)",
    "expires_days": "days the packages stay available on the hub",
    "max_pdu": "largest PDU received, bytes (default 262144)",
    "acse_timeout": "seconds to wait for association messages (default 30)",
    "dimse_timeout": "seconds to wait for DIMSE messages (default 60)",
    "network_timeout": "seconds of silence before a connection is dropped (default 60)",
    "max_associations": "associations served at once; more are refused (default 10)",
    "tls_cert": "server certificate (PEM) for DICOM TLS",
    "tls_key": "its private key (PEM), if not in tls_cert",
    "tls_ca": "CA bundle: callers must present a certificate it signed",
    "find": "answer C-FIND with what the facility may read on the hub (default true)",
}


def tls_server_context(cert: Path, key: Path | None, ca: Path | None) -> ssl.SSLContext:
    """The Basic TLS Secure Transport profile: TLS 1.2+, client certificates when ``ca``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
        if ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the DICOM TLS certificate or CA: {exc}") from exc
    return context


def _number(settings: dict[str, Any], key: str, default: float, minimum: float) -> float:
    value = settings.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"dimse source: {key} must be a number of at least {minimum}")
    return float(value)


def _recipients(value: Any, what: str) -> list[str]:
    to = [value] if isinstance(value, str) else list(value or [])
    for address in to:
        if not isinstance(address, str) or not is_valid_address(address):
            raise ConfigError(f"{what}: {address!r} is not a facility address")
    return to


class DimseSource:
    """A DICOM listener whose studies are sent, each as one package, exactly once."""

    def __init__(self, settings: dict[str, Any], gateway: Gateway) -> None:
        unknown = sorted(set(settings) - set(SOURCE_SETTINGS))
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r} in a dimse source")
        self.name = str(settings["name"])
        self.gateway = gateway
        what = f"dimse source {self.name!r}"
        if "ae_title" not in settings or "port" not in settings:
            raise ConfigError(f'{what} needs ae_title = "EMIX" and port = 11112')
        raw_allow = settings.get("allow", [])
        raw_allow = [raw_allow] if isinstance(raw_allow, str) else list(raw_allow)
        tls = None
        if settings.get("tls_cert"):
            tls = tls_server_context(
                gateway.resolve_path(settings["tls_cert"]),
                gateway.resolve_path(settings["tls_key"]) if settings.get("tls_key") else None,
                gateway.resolve_path(settings["tls_ca"]) if settings.get("tls_ca") else None,
            )
        self.listener_settings = ListenerSettings(
            ae_title=check_ae_title(str(settings["ae_title"])),
            port=int(_number(settings, "port", 0, 0)),
            host=str(settings.get("host", "0.0.0.0")),
            allow=[parse_allow(str(a)) for a in raw_allow],
            max_pdu=int(_number(settings, "max_pdu", 262144, 4096)),
            acse_timeout=_number(settings, "acse_timeout", 30, 1),
            dimse_timeout=_number(settings, "dimse_timeout", 60, 1),
            network_timeout=_number(settings, "network_timeout", 60, 1),
            max_associations=int(_number(settings, "max_associations", 10, 1)),
            tls=tls,
        )
        self.router = Router(
            routes=parse_routes(settings.get("routes", []), what),
            default=_recipients(settings.get("to"), what),
        )
        for route in self.router.routes:
            _recipients(route.to, what)
        if not self.router.default and not self.router.routes:
            raise ConfigError(f'{what} needs to = "recipient" or [[sources.routes]]')
        self.send_on = str(settings.get("send_on", "settled"))
        if self.send_on not in SEND_ON:
            raise ConfigError(f'{what}: send_on must be "settled" or "association-end"')
        self.settle_seconds = _number(settings, "settle_seconds", 5, 0)
        self.expires_days = settings.get("expires_days")
        digest = hashlib.sha256(self.name.encode()).hexdigest()[:12]
        self.spool = Spool(gateway.state_dir / f"dimse-{digest}")
        finder = None
        if settings.get("find", True) is not False:
            from emix_dimse.find import FindService

            finder = FindService(
                gateway.client, gateway.home, self.listener_settings.ae_title, self.name
            )
        self.listener = Listener(
            self.listener_settings,
            self.spool,
            self.router,
            gateway.home,
            name=self.name,
            finder=finder,
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error = ""

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        removed = self.spool.remove_strays()
        if removed:
            log_event(log, "dimse.spool.unacknowledged_removed", source=self.name, files=removed)
        self._stop.clear()
        self.listener.start()
        self._thread = threading.Thread(target=self._run, name=f"dimse:{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.listener.stop()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)
            self._thread = None

    @property
    def port(self) -> int:
        return self.listener.port

    # ------------------------------------------------------------------ sending
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # keep the listener's studies moving whatever one round did
                log.exception("dimse.source.crashed")
                self._stop.wait(1)
            self._stop.wait(TICK)
        # last round: what settled while stopping is sent now, the rest at the next start
        try:
            self.tick(final=True)
        except Exception:
            log.exception("dimse.source.crashed")

    def tick(self, *, final: bool = False) -> None:
        """One round: batch the studies that are due, send the batches that are."""
        now = time.time()
        if self.send_on == "association-end":
            due = self.spool.due_groups(0, self.listener.busy_groups(), now)
        else:
            due = self.spool.due_groups(self.settle_seconds, set(), now)
        for key in due:
            self.spool.open_batch(key)
        for batch in self.spool.unfinished(now):
            if self._stop.is_set() and not final:
                return
            self._send(batch)

    def _send(self, batch: Batch) -> None:
        if batch.state == "sealing" and batch.package_id:
            # a seal request may have reached the hub before a crash or an error
            try:
                state = self.gateway.client.status(batch.package_id).get("state")
            except NotFoundError:
                state = "gone"
            except EmixError as exc:
                self._failed(batch, exc.message)
                return
            if state not in ("open", "gone"):
                self.spool.sent(batch.id, batch.package_id)
                self._log_sent(batch, batch.package_id, len(batch.files))
                return
            self.spool.restart(batch.id)
        files = [f for f in batch.files if f.exists()]
        kw: dict[str, Any] = {}
        if self.expires_days:
            kw["expires_days"] = int(self.expires_days)
        try:
            result = self.gateway.send(
                files,
                batch.recipients,
                on_package_created=lambda pid: self.spool.note_package(batch.id, pid),
                on_seal_requested=lambda pid: self.spool.note_sealing(batch.id, pid),
                **kw,
            )
        except EmixError as exc:
            self._failed(batch, exc.message)
            return
        if not result.package_id:
            reason = result.failed[0].error if result.failed else "nothing could be sent"
            self.spool.restart(batch.id)
            self._failed(batch, reason)
            return
        if result.failed:
            self.spool.requeue(batch.id, [f.path for f in result.failed])
        self.spool.sent(batch.id, result.package_id)
        self.last_error = ""
        self._log_sent(batch, result.package_id, result.items)

    def _log_sent(self, batch: Batch, package_id: str, items: int) -> None:
        log_event(
            log,
            "package.sent",
            source=self.name,
            package=package_id,
            instances=items,
            to=batch.recipients,
        )

    def _failed(self, batch: Batch, reason: str) -> None:
        self.last_error = reason
        delay = retry_delay(batch.attempts + 1, self.gateway.retry_max_seconds)
        self.spool.failed(batch.id, reason, time.time() + delay)
        log_event(
            log,
            "batch.postponed",
            logging.WARNING,
            source=self.name,
            reason=reason,
            retry_seconds=round(delay, 1),
        )

    # ------------------------------------------------------------------ status
    def queue_depths(self) -> dict[str, int]:
        """Instances waiting for their study to settle, in a package being sent, and among
        those the ones whose sending failed and is retried (a listener never gives up)."""
        db = self.spool.db()
        waiting = db.execute("SELECT COUNT(*) FROM instances WHERE batch IS NULL").fetchone()[0]
        row = db.execute(
            "SELECT SUM(CASE WHEN attempts = 0 THEN instances ELSE 0 END) AS sending, "
            "SUM(CASE WHEN attempts > 0 THEN instances ELSE 0 END) AS retrying "
            "FROM batches WHERE state != 'sent'"
        ).fetchone()
        retrying = row["retrying"] or 0
        return {
            "pending": waiting,
            "in_flight": (row["sending"] or 0) + retrying,
            "failed": 0,
            "retrying": retrying,
        }

    def status(self) -> dict[str, Any]:
        s = self.listener_settings
        return {
            "kind": "dimse",
            "ae_title": s.ae_title,
            "listening": f"{s.host}:{self.port}",
            "allow": [str(a) for a in s.allow],
            "send_on": self.send_on,
            **self.spool.status(),
            "last_error": self.last_error,
        }
