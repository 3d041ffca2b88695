"""emix calling a DICOM node: associations, C-ECHO and C-STORE of files.

Files are sent from disk without being decoded, in their own transfer syntax; an
instance is decompressed to Explicit VR Little Endian only when the peer refused the
file's transfer syntax, and its report says so.
"""

from __future__ import annotations

import ssl
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pynetdicom import AE
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import code_to_category

from emix_core import EmixError, inspect_instance
from emix_dimse.network import configure_pynetdicom, nodelay
from emix_dimse.peers import Peer

__all__ = [
    "DimseError",
    "PeerUnavailable",
    "CallSettings",
    "InstanceToStore",
    "StoreOutcome",
    "StoreReport",
    "associate",
    "echo",
    "store_instances",
]

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
#: Presentation contexts one association may propose (PS3.8: odd IDs 1..255).
MAX_CONTEXTS = 128


class DimseError(EmixError):
    """The DICOM peer refused a request or answered something emix cannot use."""

    http_status = 502
    code = "dimse"


class PeerUnavailable(DimseError):
    """The DICOM peer cannot be reached, refused the association, or timed out."""

    http_status = 503
    code = "dimse_unavailable"


@dataclass
class CallSettings:
    """How emix calls a peer.

    :param peer: the peer's AE title, host and port.
    :param calling_ae: emix's AE title (the peer may only accept known callers).
    :param max_pdu: largest PDU emix receives.
    :param timeout: seconds for ACSE, DIMSE and network waits.
    :param tls: client-side TLS context, or none.
    """

    peer: Peer
    calling_ae: str = "EMIX"
    max_pdu: int = 262144
    timeout: float = 60
    tls: ssl.SSLContext | None = None


def associate(
    settings: CallSettings,
    contexts: Sequence[Any],
    *,
    ext_neg: list[Any] | None = None,
    evt_handlers: list[Any] | None = None,
) -> Any:
    """An established association with the peer.

    :raises PeerUnavailable: unreachable, rejected, aborted or timed out.
    """
    configure_pynetdicom()
    ae = AE(ae_title=settings.calling_ae)
    ae.maximum_pdu_size = settings.max_pdu
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.timeout
    ae.connection_timeout = min(settings.timeout, 15)
    ae.requested_contexts = list(contexts)
    peer = settings.peer
    tls_args = (settings.tls, peer.host) if settings.tls is not None else None
    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        ext_neg=ext_neg,
        evt_handlers=evt_handlers,
        tls_args=tls_args,
    )
    if assoc.is_established:
        sock = getattr(assoc.dul.socket, "socket", None)
        if sock is not None:
            nodelay(sock)
        return assoc
    if assoc.is_rejected:
        raise PeerUnavailable(
            f"the DICOM node {peer} rejected the association; check that it knows "
            f"the calling AE title {settings.calling_ae} and this host"
        )
    raise PeerUnavailable(
        f"no DICOM association with {peer}: unreachable, aborted or timed out; check "
        "host, port and AE title"
    )


def echo(settings: CallSettings) -> dict[str, Any]:
    """C-ECHO the peer: ``{"peer", "status", "seconds"}``.

    :raises PeerUnavailable: no association.
    :raises DimseError: the peer answered C-ECHO with a failure.
    """
    started = time.monotonic()
    assoc = associate(settings, [build_context(Verification)])
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if not status or "Status" not in status:
        raise PeerUnavailable(f"the DICOM node {settings.peer} did not answer C-ECHO")
    if status.Status != 0x0000:
        raise DimseError(
            f"the DICOM node {settings.peer} answered C-ECHO with 0x{status.Status:04X}"
        )
    return {
        "peer": str(settings.peer),
        "status": "0x0000",
        "seconds": round(time.monotonic() - started, 4),
    }


# --------------------------------------------------------------------------- C-STORE


@dataclass
class InstanceToStore:
    """One file to C-STORE; ``item_id`` ties it to a package item."""

    path: Path
    item_id: int | None = None
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    transfer_syntax_uid: str = ""
    study_uid: str = ""


@dataclass
class StoreOutcome:
    """What the peer answered for one instance."""

    instance: InstanceToStore
    status: str  # stored, warning, failed
    code: int | None = None
    reason: str = ""
    sent_as: str = ""  # the transfer syntax it travelled in

    def to_dict(self, *, with_uids: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "item": self.instance.item_id,
            "status": self.status,
            "code": None if self.code is None else f"0x{self.code:04X}",
            "transfer_syntax": self.sent_as,
        }
        if self.reason:
            out["reason"] = self.reason
        if with_uids:
            out["sop_instance_uid"] = self.instance.sop_instance_uid
        return out


@dataclass
class StoreReport:
    """Every instance's outcome, in order."""

    outcomes: list[StoreOutcome] = field(default_factory=list)
    seconds: float = 0.0
    bytes: int = 0

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def complete(self) -> bool:
        return all(o.status != "failed" for o in self.outcomes)

    @property
    def decompressed(self) -> int:
        return sum(1 for o in self.outcomes if "decompressed" in o.reason)

    def summary(self) -> dict[str, int]:
        return {
            "stored": self.count("stored") + self.count("warning"),
            "warnings": self.count("warning"),
            "failed": self.count("failed"),
            "decompressed": self.decompressed,
        }

    def to_dict(self, *, with_uids: bool) -> dict[str, Any]:
        return {
            **self.summary(),
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "instances": [o.to_dict(with_uids=with_uids) for o in self.outcomes],
        }


def describe(paths: Sequence[tuple[Path, int | None]]) -> tuple[list[InstanceToStore], list[str]]:
    """Read each file's header; files that are not valid DICOM are returned as reasons."""
    out: list[InstanceToStore] = []
    bad: list[str] = []
    for path, item_id in paths:
        try:
            info = inspect_instance(path)
        except (EmixError, OSError) as exc:
            bad.append(getattr(exc, "message", str(exc)))
            continue
        out.append(
            InstanceToStore(
                path,
                item_id,
                info.sop_class_uid,
                info.sop_instance_uid,
                info.transfer_syntax_uid,
                info.study_uid,
            )
        )
    return out, bad


def _context_plan(instances: Sequence[InstanceToStore]) -> list[list[tuple[str, str]]]:
    """(SOP class, transfer syntax) pairs, split so each association proposes at most
    :data:`MAX_CONTEXTS` contexts, counting an Explicit VR Little Endian fallback per class."""
    pairs = sorted({(i.sop_class_uid, i.transfer_syntax_uid) for i in instances})
    plans: list[list[tuple[str, str]]] = [[]]
    for pair in pairs:
        plan = plans[-1]
        classes = {c for c, _ in plan} | {pair[0]}
        wanted = {*plan, pair} | {(c, EXPLICIT_LE) for c in classes}
        if len(wanted) > MAX_CONTEXTS:
            plans.append([pair])
        else:
            plan.append(pair)
    return [p for p in plans if p]


def store_instances(
    settings: CallSettings,
    instances: Sequence[InstanceToStore],
    *,
    progress: Callable[[int, int], None] | None = None,
) -> StoreReport:
    """C-STORE every instance; one outcome each. Unreachable peers raise.

    :raises PeerUnavailable: no association could be made, or the peer dropped it.
    """
    report = StoreReport()
    started = time.monotonic()
    total = sum(i.path.stat().st_size for i in instances)
    done = 0
    for plan in _context_plan(instances):
        wanted = set(plan) | {(c, EXPLICIT_LE) for c, _ in plan}
        contexts = [build_context(c, t) for c, t in sorted(wanted)]
        batch = [i for i in instances if (i.sop_class_uid, i.transfer_syntax_uid) in set(plan)]
        assoc = associate(settings, contexts)
        try:
            accepted = {
                (cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
            }
            for instance in batch:
                report.outcomes.append(_store_one(assoc, instance, accepted, settings.peer))
                done += instance.path.stat().st_size
                if progress is not None:
                    progress(done, total)
                if not assoc.is_established:
                    raise PeerUnavailable(
                        f"the DICOM node {settings.peer} dropped the association while storing"
                    )
        finally:
            if assoc.is_established:
                assoc.release()
    report.seconds = time.monotonic() - started
    report.bytes = done
    return report


def _store_one(assoc: Any, instance: InstanceToStore, accepted: set, peer: Peer) -> StoreOutcome:
    pair = (instance.sop_class_uid, instance.transfer_syntax_uid)
    note = ""
    if pair in accepted:
        payload: Any = str(instance.path)
        sent_as = instance.transfer_syntax_uid
    elif (instance.sop_class_uid, EXPLICIT_LE) in accepted:
        try:
            payload = _decompressed(instance.path)
        except Exception as exc:  # no decoder for this syntax here, or bad pixel data
            return StoreOutcome(
                instance,
                "failed",
                reason=f"{peer} refuses transfer syntax {instance.transfer_syntax_uid} "
                f"and it cannot be decompressed here ({type(exc).__name__})",
            )
        sent_as = EXPLICIT_LE
        note = (
            f"decompressed to Explicit VR Little Endian: {peer} refuses "
            f"{instance.transfer_syntax_uid}"
        )
    else:
        return StoreOutcome(
            instance,
            "failed",
            reason=f"{peer} accepts neither this SOP class nor Explicit VR Little Endian for it",
        )
    try:
        status = assoc.send_c_store(payload)
    except (OSError, ValueError, AttributeError) as exc:
        return StoreOutcome(instance, "failed", reason=f"not sent ({type(exc).__name__})")
    if not status or "Status" not in status:
        return StoreOutcome(instance, "failed", reason="no answer (association dropped)")
    code = int(status.Status)
    category = code_to_category(code)
    if category == "Success":
        return StoreOutcome(instance, "stored", code, note, sent_as)
    if category == "Warning":
        return StoreOutcome(instance, "warning", code, note or "stored with a warning", sent_as)
    comment = str(status.get("ErrorComment", "") or "")[:200]
    reason = f"refused with status 0x{code:04X}" + (f": {comment}" if comment else "")
    return StoreOutcome(instance, "failed", code, reason, sent_as)


def _decompressed(path: Path) -> Any:
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        ds.decompress()
    return ds
