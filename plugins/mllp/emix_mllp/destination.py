"""The ``mllp`` gateway destination: every report of an arrived package, as an ORU^R01.

For each report item of the package (any format emix reads; a PDF or RTF is carried
as an ED attachment, with the patient and study of the package's summary), the
destination renders HL7 v2.5.1 with the core report API, sets the MSH routing
fields from its settings and sends it with :class:`~emix_mllp.client.MllpClient`.

A report the engine accepted is written to a journal (package id and the report's
SHA-256, no PHI) before the next one is sent, so a package handed over again after a
crash or a failed attempt resends only what was not acknowledged. Transport failures
raise :class:`~emix_mllp.client.MllpError`, which the gateway retries with backoff; a
report emix cannot read is not sent and is listed, without PHI, in the result.
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
from emix_mllp.client import MllpClient

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
    "sending_application": "MSH-3 (default EMIX)",
    "sending_facility": "MSH-4 (default: empty)",
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
        self.client = MllpClient(
            str(host),
            port,
            timeout=_positive(settings, "timeout", 10.0),
            retries=int(settings.get("retries", 3)),
            backoff=_positive(settings, "backoff", 1.0),
            tls=_tls(settings.get("tls", False)),
        )
        self.header = {
            key: str(settings.get(key, default))
            for key, default in (
                ("sending_application", "EMIX"),
                ("sending_facility", ""),
                ("receiving_application", ""),
                ("receiving_facility", ""),
            )
        }
        self.pm = getattr(gateway, "pm", None)
        if self.pm is None:
            from emix_core import default_plugin_manager

            self.pm = default_plugin_manager()
        journal = settings.get("journal")
        state = getattr(gateway, "state_dir", None)
        folder = Path(journal) if journal else (Path(state) / "mllp" if state else None)
        self.journal = _Journal(folder / _safe(self.name) if folder else None)

    def deliver(self, package: Package, path: Path) -> dict[str, Any]:
        """Send every report of the package not yet acknowledged.

        :return: ``{"sent", "already_sent", "not_sent": [{"item", "reason"}]}``.
        :raises MllpError: the engine did not accept a report after every retry.
        """
        context = context_from_studies(package.studies)
        result: dict[str, Any] = {"sent": 0, "already_sent": 0, "not_sent": []}
        for label, file in _report_files(package, path):
            try:
                data = read_report_file(file)
                key = hashlib.sha256(data).hexdigest()
                if self.journal.has(package.id, key):
                    result["already_sent"] += 1
                    continue
                message = self._message(data, context)
            except (ReportFormatError, PayloadTooLarge) as exc:
                result["not_sent"].append({"item": label, "reason": exc.message})
                log.warning(
                    "mllp.report_unreadable",
                    extra={"emix": {"package": package.id, "item": label, "reason": exc.code}},
                )
                continue
            if message is None:
                continue
            self.client.send(message)
            self.journal.add(package.id, key)
            result["sent"] += 1
        return result

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
        return hl7_routing_header(hl7, **self.header)


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
    """Which reports of which package the engine acknowledged (durable, no PHI)."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.memory: set[tuple[str, str]] = set()

    def _file(self, package_id: str) -> Path | None:
        if self.folder is None:
            return None
        name = package_id if _SAFE_RE.match(package_id) else _digest(package_id)
        return self.folder / f"{name}.sent"

    def has(self, package_id: str, key: str) -> bool:
        if (package_id, key) in self.memory:
            return True
        file = self._file(package_id)
        return bool(file and file.is_file() and key in file.read_text("ascii").split())

    def add(self, package_id: str, key: str) -> None:
        self.memory.add((package_id, key))
        file = self._file(package_id)
        if file is None:
            return
        file.parent.mkdir(parents=True, exist_ok=True)
        with file.open("a", encoding="ascii") as handle:
            handle.write(key + "\n")
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
