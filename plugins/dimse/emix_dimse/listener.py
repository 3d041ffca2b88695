"""The C-ECHO / C-STORE SCP: DICOM nodes push studies to emix.

Each instance is checked (complete, well-formed DICOM whose SOP Instance UID is the one
announced), routed to its recipients, and kept in the :class:`~emix_dimse.spool.Spool`
before the SCU is told *Success*; the dataset bytes are kept exactly as received.
Callers are checked against an allowlist of AE titles (and hosts) before any
presentation context is negotiated; every association is audited when it ends.
"""

from __future__ import annotations

import fnmatch
import logging
import ssl
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from emix_core import (
    AuditAction,
    AuditEvent,
    AuditOutcome,
    ConfigError,
    EmixError,
    LocalHome,
    inspect_instance,
    log_event,
)
from emix_dimse import fastpath
from emix_dimse.network import GuardedRequestHandler, configure_pynetdicom
from emix_dimse.peers import AllowedCaller
from emix_dimse.spool import Spool

__all__ = ["ListenerSettings", "Listener", "Route", "Router"]

log = logging.getLogger("emix.dimse")

# C-STORE failure statuses (PS3.4 B.2.3)
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
#: no route sends this instance anywhere: refused, so the modality keeps it
NOT_ROUTED = 0xC001


@dataclass
class Route:
    """Where instances go: by calling AE title and/or by attributes of the dataset.

    :param to: recipient addresses.
    :param calling_ae: the SCU's AE title (``fnmatch`` pattern), or any.
    :param match: DICOM keyword → ``fnmatch`` pattern, e.g. ``{"Modality": "CT"}``.
    """

    to: list[str]
    calling_ae: str = ""
    match: dict[str, str] = field(default_factory=dict)

    def applies(self, calling_ae: str, attributes: dict[str, str]) -> bool:
        if self.calling_ae and not fnmatch.fnmatchcase(calling_ae, self.calling_ae):
            return False
        return all(
            fnmatch.fnmatchcase(attributes.get(k, ""), pattern) for k, pattern in self.match.items()
        )


@dataclass
class Router:
    """The first route that applies wins; ``default`` otherwise (may be empty)."""

    routes: list[Route] = field(default_factory=list)
    default: list[str] = field(default_factory=list)

    @property
    def keywords(self) -> set[str]:
        return {k for r in self.routes for k in r.match}

    def recipients(self, calling_ae: str, path: Path) -> list[str]:
        attributes: dict[str, str] = {}
        if self.keywords:
            attributes = _attributes(path, self.keywords)
        for route in self.routes:
            if route.applies(calling_ae, attributes):
                return list(route.to)
        return list(self.default)


def _attributes(path: Path, keywords: set[str]) -> dict[str, str]:
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=sorted(keywords))
    out = {}
    for keyword in keywords:
        value = ds.get(keyword, "")
        out[keyword] = "\\".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
    return out


@dataclass
class ListenerSettings:
    """How the SCP listens.

    :param ae_title: its AE title (callers must call it by this name).
    :param port: TCP port (104 and 11112 are the usual ones).
    :param host: address to listen on.
    :param allow: accepted callers; empty accepts any caller (with a warning).
    :param max_pdu: largest PDU the listener receives (bytes).
    :param acse_timeout: seconds to wait for association messages.
    :param dimse_timeout: seconds to wait for DIMSE messages.
    :param network_timeout: seconds of silence before a connection is dropped.
    :param max_associations: associations served at once; more are rejected (transient).
    :param tls: server-side TLS context (DICOM Basic TLS Secure Transport), or none.
    """

    ae_title: str
    port: int
    host: str = "0.0.0.0"
    allow: list[AllowedCaller] = field(default_factory=list)
    max_pdu: int = 262144
    acse_timeout: float = 30
    dimse_timeout: float = 60
    network_timeout: float = 60
    max_associations: int = 10
    tls: ssl.SSLContext | None = None


@dataclass
class _Association:
    """What one association did, for its audit event."""

    calling_ae: str
    address: str
    stored: int = 0
    bytes: int = 0
    refused: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    studies: set[str] = field(default_factory=set)
    patients: set[str] = field(default_factory=set)
    groups: set[str] = field(default_factory=set)
    accepted: bool = False


class Listener:
    """A running C-ECHO / C-STORE SCP feeding a spool."""

    def __init__(
        self,
        settings: ListenerSettings,
        spool: Spool,
        router: Router,
        home: LocalHome,
        *,
        name: str = "dimse",
        on_stored: Callable[[str], None] | None = None,
        finder: Any = None,
    ) -> None:
        self.settings = settings
        self.finder = finder  # a FindService answering C-FIND, or none
        self.spool = spool
        self.router = router
        self.home = home
        self.name = name
        self.on_stored = on_stored
        self._associations: dict[int, _Association] = {}
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None
        self.counters = {"associations": 0, "rejected": 0, "stored": 0, "refused": 0}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        configure_pynetdicom()
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.maximum_pdu_size = s.max_pdu
        ae.acse_timeout = s.acse_timeout
        ae.dimse_timeout = s.dimse_timeout
        ae.network_timeout = s.network_timeout
        ae.maximum_associations = s.max_associations
        ae.require_called_aet = True
        ae.add_supported_context(Verification)
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_ECHO, lambda event: 0x0000),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        if self.finder is not None:
            from emix_dimse.find import FIND_CONTEXTS

            for context in FIND_CONTEXTS:
                ae.add_supported_context(context)
            handlers.append((evt.EVT_C_FIND, self.finder.handle))
        try:
            self._server = ThreadedAssociationServer(
                ae,
                (s.host, s.port),
                s.ae_title,
                ae.supported_contexts,
                s.tls,
                handlers,
                request_handler=GuardedRequestHandler,
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {s.host}:{s.port} ({exc.strerror or exc}); "
                "is another DICOM node using that port?"
            ) from exc
        self._server.daemon_threads = True
        self._server.incoming_folder = self.spool.files  # type: ignore[attr-defined]
        ae._servers.append(self._server)  # pynetdicom's shutdown() removes it from there
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"dimse-scp:{self.name}", daemon=True
        )
        self._thread.start()
        if not s.allow:
            log_event(
                log,
                "dimse.listener.open_to_any_caller",
                logging.WARNING,
                listener=self.name,
                hint="set allowed callers (--allow AET@HOST) to refuse unknown nodes",
            )
        log_event(
            log,
            "dimse.listener.started",
            listener=self.name,
            ae_title=s.ae_title,
            host=s.host,
            port=self.port,
            tls=s.tls is not None,
        )

    @property
    def port(self) -> int:
        if self._server is None:
            return self.settings.port
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            for assoc in list(self._server.active_associations):
                assoc.abort()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def busy_groups(self) -> set[str]:
        """Study groups an open association has added to (for sending at its end)."""
        with self._lock:
            return {g for a in self._associations.values() for g in a.groups}

    # ------------------------------------------------------------------ handlers
    def _state(self, event: Any) -> _Association:
        key = id(event.assoc)
        with self._lock:
            state = self._associations.get(key)
            if state is None:
                requestor = event.assoc.requestor
                title = getattr(requestor.primitive, "calling_ae_title", None)
                state = _Association(
                    calling_ae=str(title or requestor.ae_title or "").strip(),
                    address=str(requestor.address),
                )
                self._associations[key] = state
            return state

    def _on_requested(self, event: Any) -> None:
        state = self._state(event)
        allow = self.settings.allow
        if allow and not any(a.matches(state.calling_ae, state.address) for a in allow):
            # permanent, by the service user, calling AE title not recognised
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)
            event.assoc.kill()
            with self._lock:
                self.counters["rejected"] += 1

    def _on_established(self, event: Any) -> None:
        state = self._state(event)
        state.accepted = True
        with self._lock:
            self.counters["associations"] += 1

    def _on_rejected(self, event: Any) -> None:
        with self._lock:
            self.counters["rejected"] += 1

    def _on_store(self, event: Any) -> int:
        state = self._state(event)
        try:
            path = Path(event.dataset_path)
        except AttributeError:  # no data set in the request
            return self._refuse(state, "no data set", CANNOT_UNDERSTAND)
        try:
            arrival = self.spool.receive(path)
        except OSError:
            return self._refuse(state, "disk refused", OUT_OF_RESOURCES)
        kept = None
        try:
            try:
                instance = inspect_instance(arrival.path)
            except EmixError as exc:
                return self._refuse(state, type(exc).__name__, CANNOT_UNDERSTAND)
            except OSError:
                return self._refuse(state, "unreadable", OUT_OF_RESOURCES)
            announced = str(event.request.AffectedSOPInstanceUID or "")
            if instance.sop_instance_uid != announced:
                return self._refuse(state, "SOP Instance UID differs", DATASET_MISMATCH)
            try:
                recipients = self.router.recipients(state.calling_ae, arrival.path)
            except Exception:  # a data set the rule cannot read
                return self._refuse(state, "routing rule failed", CANNOT_UNDERSTAND)
            if not recipients:
                return self._refuse(state, "no route", NOT_ROUTED)
            try:
                kept = self.spool.keep(
                    arrival, instance.study_uid, instance.sop_instance_uid, recipients
                )
            except OSError:
                return self._refuse(state, "disk refused", OUT_OF_RESOURCES)
        finally:
            if kept is None:
                self.spool.discard(arrival)
        with self._lock:
            state.stored += 1
            state.bytes += kept.size
            state.studies.add(instance.study_uid)
            if instance.patient_id:
                state.patients.add(instance.patient_id)
            state.groups.add(kept.group_key)
            self.counters["stored"] += 1
        if self.on_stored is not None:
            self.on_stored(kept.group_key)
        return 0x0000

    def _refuse(self, state: _Association, reason: str, status: int) -> int:
        with self._lock:
            state.refused += 1
            state.reasons[reason] = state.reasons.get(reason, 0) + 1
            self.counters["refused"] += 1
        log_event(
            log,
            "dimse.store.refused",
            logging.WARNING,
            listener=self.name,
            calling_ae=state.calling_ae,
            reason=reason,
            status=f"0x{status:04X}",
        )
        return status

    def _on_closed(self, event: Any) -> None:
        fastpath.discard_incomplete(event.assoc)
        with self._lock:
            state = self._associations.pop(id(event.assoc), None)
        if state is None:
            return
        try:
            self._audit(state)
        except Exception:  # never take the listener down for an audit failure
            log.exception("dimse.audit_failed")

    def _audit(self, state: _Association) -> None:
        actor = f"dicom:{state.calling_ae or 'unknown'}"
        if not state.accepted:
            self.home.audit(
                AuditEvent(
                    event_type="security-alert",
                    action=AuditAction.EXECUTE,
                    outcome=AuditOutcome.MINOR_FAILURE,
                    actor=actor,
                    source=state.address,
                    detail=f"DICOM association to {self.settings.ae_title} refused "
                    "(calling AE title or host not allowed, busy, or malformed request)",
                )
            )
            log_event(
                log,
                "dimse.association.refused",
                logging.WARNING,
                listener=self.name,
                calling_ae=state.calling_ae,
            )
            return
        outcome = AuditOutcome.SUCCESS
        if state.refused:
            outcome = AuditOutcome.MINOR_FAILURE if state.stored else AuditOutcome.SERIOUS_FAILURE
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(state.reasons.items()))
        if state.stored or state.refused:
            self.home.audit(
                AuditEvent(
                    event_type="instances-transferred",
                    action=AuditAction.CREATE,
                    outcome=outcome,
                    actor=actor,
                    source=state.address,
                    phi={"studies": sorted(state.studies), "patients": sorted(state.patients)},
                    detail=f"C-STORE into {self.settings.ae_title}: {state.stored} instances "
                    f"({state.bytes} bytes) kept, {state.refused} refused"
                    + (f" ({reasons})" if reasons else ""),
                )
            )
        else:
            self.home.audit(
                AuditEvent(
                    event_type="user-authentication",
                    action=AuditAction.EXECUTE,
                    outcome=outcome,
                    actor=actor,
                    source=state.address,
                    detail=f"DICOM association to {self.settings.ae_title} (no instance stored)",
                )
            )
        log_event(
            log,
            "dimse.association.ended",
            listener=self.name,
            calling_ae=state.calling_ae,
            stored=state.stored,
            refused=state.refused,
            bytes=state.bytes,
        )


def parse_routes(raw: Sequence[Any], what: str) -> list[Route]:
    """``[[sources.routes]]`` tables → routes (``to`` required)."""
    routes = []
    for index, table in enumerate(raw, start=1):
        if not isinstance(table, dict):
            raise ConfigError(f"{what}: route {index} must be a table")
        unknown = sorted(set(table) - {"to", "calling_ae", "match"})
        if unknown:
            raise ConfigError(f"{what}: unknown setting {unknown[0]!r} in route {index}")
        to = table.get("to")
        to = [to] if isinstance(to, str) else list(to or [])
        if not to or not all(isinstance(t, str) and t for t in to):
            raise ConfigError(f'{what}: route {index} needs to = "recipient"')
        match = table.get("match", {})
        if not isinstance(match, dict):
            raise ConfigError(f"{what}: route {index}: match must be a table")
        routes.append(
            Route(
                to=to,
                calling_ae=str(table.get("calling_ae", "")),
                match={str(k): str(v) for k, v in match.items()},
            )
        )
    return routes
