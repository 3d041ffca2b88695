"""The ``mllp`` gateway destination: every report of an arrived package, as an ORU^R01.

For each report item of the package (any format emix reads; a PDF or RTF is carried
as an ED attachment, with the patient and study of the package's summary), the
destination renders HL7 v2.5.1 with the core report API, sets the MSH routing
fields from its settings and sends it with :class:`~emix_mllp.client.MllpClient`.
Its control id (MSH-10) derives from the report, so a copy sent again carries the
same one and the engine can drop it.

What became of each message is journaled (package id, the report's SHA-256 and the
outcome: no PHI) before the next one is sent, reported in the delivery result
(``messages``: item, control id, outcome, ACK code, attempts) and audited. A package
handed over again after a crash or a failed attempt resends only what was neither
acknowledged nor rejected: a rejection (``AR``/``CR``) is final and its identical
bytes are never resent. Transport failures and ``AE``/``CE`` raise
:class:`~emix_mllp.client.MllpError` after the client's retries, which the gateway
retries with backoff; a report emix cannot read is not sent and is listed, without
PHI, in the result.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import ssl
from pathlib import Path
from typing import Any

from emix_core import (
    DICOM_MEDIA_TYPE,
    Attachment,
    AuditAction,
    AuditEvent,
    AuditOutcome,
    ConfigError,
    Package,
    PayloadTooLarge,
    Report,
    ReportFormatError,
    context_from_studies,
    fill_from,
    hl7_routing_header,
    item_relative_path,
    parse_report,
    read_report_file,
    render_report,
    report_formats,
    sniff_report_format,
)
from emix_mllp.client import MllpClient, MllpError, MllpRejected, control_id

__all__ = ["SETTINGS", "MllpDestination"]

log = logging.getLogger(__name__)

#: Every setting of a ``[[destinations]]`` table of kind ``mllp``.
SETTINGS = {
    "kind": '"mllp"',
    "name": "name of this destination (default: mllp)",
    "host": "the interface engine's host (required)",
    "port": "its MLLP port (required; 2575 is customary)",
    "timeout": "seconds to connect and to wait for each ACK (default 10)",
    "retries": "retries of one message on NAK or timeout, before the gateway's own (default 3)",
    "backoff": "seconds before the first retry, doubled each time (default 1)",
    "tls": "true to speak MLLP over TLS, or the path of a CA bundle (default false)",
    "ack_mode": '"original" (default) or "enhanced": a CA is then followed by the application ACK',
    "application_ack_timeout": "enhanced mode: seconds to wait for the application ACK (30)",
    "sending_application": "MSH-3 (default EMIX)",
    "sending_facility": "MSH-4 (default: the facility's name^OID^ISO)",
    "receiving_application": "MSH-5 (default: empty)",
    "receiving_facility": "MSH-6 (default: empty)",
    "journal": "folder of the sent-reports journal (default: <gateway state>/mllp)",
}
_SAFE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,80}$")


class MllpDestination:
    """Sends a package's reports to an EMR interface engine over MLLP.

    :param settings: the ``[[destinations]]`` table (see :data:`SETTINGS`).
    :param gateway: the gateway (its plugin manager and state folder are used), or
        ``None`` outside a gateway.
    """

    def __init__(self, settings: dict[str, Any], gateway: Any = None) -> None:
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r} for an mllp destination")
        self.name = str(settings.get("name") or "mllp")
        host, port = settings.get("host"), settings.get("port")
        if not host or not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigError(
                f'mllp destination {self.name!r} needs host = "..." and port = 1..65535'
            )
        mode = settings.get("ack_mode", "original")
        if mode not in ("original", "enhanced"):
            raise ConfigError('mllp destination setting ack_mode must be "original" or "enhanced"')
        self.enhanced = mode == "enhanced"
        self.client = MllpClient(
            str(host),
            port,
            timeout=_positive(settings, "timeout", 10.0),
            retries=int(settings.get("retries", 3)),
            backoff=_positive(settings, "backoff", 1.0),
            tls=_tls(settings.get("tls", False)),
            enhanced=self.enhanced,
            application_ack_timeout=_positive(settings, "application_ack_timeout", 30.0),
        )
        self.header: dict[str, str | None] = {
            key: None if settings.get(key, default) is None else str(settings.get(key, default))
            for key, default in (
                ("sending_application", "EMIX"),
                ("sending_facility", None),
                ("receiving_application", ""),
                ("receiving_facility", ""),
            )
        }
        self.home = getattr(gateway, "home", None)
        config = getattr(self.home, "config", None)
        self.facility_oid = config.identifiers.facility_oid if config is not None else ""
        self.pm = getattr(gateway, "pm", None)
        if self.pm is None:
            from emix_core import default_plugin_manager

            self.pm = default_plugin_manager()
        journal = settings.get("journal")
        state = getattr(gateway, "state_dir", None)
        folder = Path(journal) if journal else (Path(state) / "mllp" if state else None)
        self.journal = _Journal(folder / _safe(self.name) if folder else None)

    def deliver(self, package: Package, path: Path) -> dict[str, Any]:
        """Send every report of the package neither acknowledged nor rejected yet.

        :return: ``{"sent", "already_sent", "rejected", "not_sent": [{"item",
            "reason"}], "messages": [{"item", "control_id", "outcome", "ack",
            "attempts"}]}``; outcomes are ``accepted``, ``committed``, ``rejected``,
            and, for a report handled before, ``already_`` and its outcome.
        :raises MllpError: the engine did not accept a report after every retry.
        """
        context = context_from_studies(package.studies, facility_oid=self.facility_oid)
        result: dict[str, Any] = {
            "sent": 0, "already_sent": 0, "rejected": 0, "not_sent": [], "messages": []
        }  # fmt: skip
        for label, file in _report_files(package, path):
            try:
                data = read_report_file(file)
                key = hashlib.sha256(data).hexdigest()
                earlier = self.journal.get(package.id, key)
                if earlier is not None:
                    result["already_sent"] += 1
                    outcome, _, control = earlier.partition(" ")
                    result["messages"].append(
                        {"item": label, "control_id": control, "outcome": f"already_{outcome}"}
                    )
                    continue
                message = self._message(data, context)
            except (ReportFormatError, PayloadTooLarge) as exc:
                result["not_sent"].append({"item": label, "reason": exc.message})
                log.warning(
                    "mllp.report_unreadable",
                    extra={"emix": {"package": package.id, "item": label, "reason": exc.code}},
                )
                self._audit(package, label, "", "", f"not sent, unreadable ({exc.code})")
                continue
            if message is None:
                continue
            result["messages"].append(self._send(package, label, key, message, result))
        return result

    def _send(
        self, package: Package, label: str, key: str, message: bytes, result: dict[str, Any]
    ) -> dict[str, Any]:
        """Send one message; journal, audit and report what became of it."""
        control = control_id(message)
        try:
            delivery = self.client.deliver(message)
        except MllpRejected as exc:
            delivery = exc.delivery
            self.journal.add(package.id, key, f"rejected {control}")
            result["rejected"] += 1
            self._audit(package, label, control, delivery.ack.code, exc.message)
            log.warning(
                "mllp.rejected",
                extra={"emix": {"package": package.id, "item": label, "ack": delivery.ack.code}},
            )
        except MllpError as exc:
            self._audit(package, label, control, "", exc.message)
            raise
        else:
            self.journal.add(package.id, key, f"{delivery.outcome} {control}")
            result["sent"] += 1
            self._audit(package, label, control, delivery.ack.code, "")
        entry = {
            "item": label,
            "control_id": control,
            "outcome": delivery.outcome,
            "ack": delivery.ack.code,
            "attempts": delivery.attempts,
        }
        if delivery.commit is not None:
            entry["commit"] = delivery.commit.code
        return entry

    def _audit(self, package: Package, label: str, control: str, ack: str, error: str) -> None:
        """An Export audit event per message (no PHI in the detail; studies sealed)."""
        if self.home is None:
            return
        if error and ack:
            outcome, what = AuditOutcome.SERIOUS_FAILURE, f"rejected ({ack})"
        elif error.startswith("not sent"):
            outcome, what = AuditOutcome.SERIOUS_FAILURE, error
        elif error:
            outcome, what = AuditOutcome.MINOR_FAILURE, f"not acknowledged, to be retried: {error}"
        else:
            outcome, what = AuditOutcome.SUCCESS, f"accepted ({ack})"
        self.home.audit(
            AuditEvent(
                event_type="export",
                action=AuditAction.READ,
                outcome=outcome,
                actor="system",
                source=self.client.address,
                package_id=package.id,
                phi={"studies": [s.get("study_uid") for s in package.studies]},
                detail=f"report {label} for the EMR of destination {self.name}"
                + (f", HL7 message {control}" if control else "")
                + f": {what}",
            )
        )

    def _message(self, data: bytes, context: Report | None) -> bytes | None:
        fmt = sniff_report_format(data)
        formats = report_formats(self.pm)
        if fmt in ("pdf", "rtf"):
            title = f"Imaging report ({fmt.upper()})"
            report = Report(attachments=[Attachment(formats[fmt].media_type, data, title)])
        elif fmt is None or (fmt in formats and formats[fmt].readable):
            assert self.pm is not None
            report = parse_report(self.pm, data, None if fmt else "text/plain")
        else:
            return None
        assert self.pm is not None
        hl7 = render_report(self.pm, fill_from(report, context), "hl7")
        hl7 = hl7_routing_header(hl7, **self.header)
        return _acknowledgement_types(hl7) if self.enhanced else hl7


def _acknowledgement_types(message: bytes) -> bytes:
    """MSH-15 and MSH-16 ``AL``: ask for the commit and the application ACK."""
    msh, sep, rest = message.partition(b"\r")
    fields = msh.split(b"|")
    fields += [b""] * max(0, 16 - len(fields))
    fields[14] = fields[15] = b"AL"
    return b"|".join(fields) + sep + rest


def _report_files(package: Package, path: Path) -> list[tuple[str, Path]]:
    """(label, file) of each report item: not DICOM, present, recognised as a report.

    Only the package's own items are considered, so copies written beside them in a
    preferred format are not sent a second time. The label is the item number.
    """
    found = []
    for item in package.items:
        if item.media_type == DICOM_MEDIA_TYPE:
            continue
        file = path / item_relative_path(item)
        if not file.is_file():
            continue
        with file.open("rb") as handle:
            head = handle.read(65536)
        if sniff_report_format(head) or file.suffix.lower() == ".txt":
            found.append((f"item-{item.id}", file))
    return found


class _Journal:
    """What became of which report of which package (durable, no PHI).

    One line per message: the report file's SHA-256, then ``accepted`` or
    ``rejected`` and the control id (a bare hash, from older versions, is accepted).
    """

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.memory: dict[tuple[str, str], str] = {}

    def _file(self, package_id: str) -> Path | None:
        if self.folder is None:
            return None
        name = package_id if _SAFE_RE.match(package_id) else _digest(package_id)
        return self.folder / f"{name}.sent"

    def get(self, package_id: str, key: str) -> str | None:
        """``"accepted <control id>"``, ``"rejected <control id>"`` or ``None``."""
        if (package_id, key) in self.memory:
            return self.memory[(package_id, key)]
        file = self._file(package_id)
        if not (file and file.is_file()):
            return None
        for line in file.read_text("ascii").splitlines():
            digest, _, state = line.partition(" ")
            if digest == key:
                return state or "accepted "
        return None

    def add(self, package_id: str, key: str, state: str) -> None:
        self.memory[(package_id, key)] = state
        file = self._file(package_id)
        if file is None:
            return
        file.parent.mkdir(parents=True, exist_ok=True)
        with file.open("a", encoding="ascii") as handle:
            handle.write(f"{key} {state}\n")
            handle.flush()
            os.fsync(handle.fileno())


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:32]


def _safe(name: str) -> str:
    return name if _SAFE_RE.match(name) else _digest(name)


def _positive(settings: dict[str, Any], key: str, default: float) -> float:
    value = settings.get(key, default)
    if not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"mllp destination setting {key} must be a positive number")
    return float(value)


def _tls(value: Any) -> ssl.SSLContext | None:
    if value is False or value is None:
        return None
    if value is True:
        return ssl.create_default_context()
    if isinstance(value, str):
        return ssl.create_default_context(cafile=value)
    raise ConfigError("mllp destination setting tls must be true, false or a CA bundle path")
