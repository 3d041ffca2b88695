"""A received package into a PACS with C-STORE: the CLI's ``deliver`` and the gateway
destination of kind ``dimse``.

Every DICOM item is stored in its own transfer syntax (decompressed only when the PACS
refuses it); documents are counted, not stored. Storing the same package twice is
harmless: a PACS answers a C-STORE of an instance it has with success (or a warning).
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emix_core import (
    DICOM_MEDIA_TYPE,
    AuditAction,
    ConfigError,
    LocalHome,
    Package,
    audited_transfer,
    item_relative_path,
)
from emix_dimse.peers import check_ae_title, parse_peer
from emix_dimse.scu import (
    CallSettings,
    InstanceToStore,
    PeerUnavailable,
    StoreOutcome,
    StoreReport,
    describe,
    store_instances,
)

if TYPE_CHECKING:
    from emix_core import Gateway, HubClient

__all__ = [
    "DESTINATION_SETTINGS",
    "DeliveryResult",
    "DimseDestination",
    "deliver_package",
    "store_folder",
    "work_folder",
]

Progress = Callable[[int, int], None]


@contextmanager
def work_folder(home: LocalHome, label: str) -> Iterator[Path]:
    """A private temporary folder in the facility home, removed when done."""
    root = home.path / "tmp"
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder = root / f"{label}-{secrets.token_hex(6)}"
    folder.mkdir(mode=0o700)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def store_folder(
    package: Package,
    folder: Path,
    settings: CallSettings,
    *,
    home: LocalHome,
    actor: str,
    progress: Progress | None = None,
) -> tuple[StoreReport, int]:
    """C-STORE the DICOM items of a received package folder; audit the transfer.

    :returns: the report and the number of documents (non-DICOM items) left out.
    """
    dicom = [i for i in package.items if i.media_type == DICOM_MEDIA_TYPE]
    documents = len(package.items) - len(dicom)
    instances, bad = describe([(folder / item_relative_path(i), i.id) for i in dicom])
    peer = settings.peer
    with audited_transfer(
        home,
        action=AuditAction.READ,
        actor=actor,
        peer=peer.host,
        package_id=package.id,
        phi={"studies": sorted({i.study_uid for i in instances if i.study_uid})},
        what=f"C-STORE into {peer.ae_title}",
        begin=f"storing {len(instances)} instances into {peer.ae_title} with C-STORE",
    ) as audit:
        report = store_instances(settings, instances, progress=progress)
        for reason in bad:  # items that are not valid DICOM: reported, never sent
            report.outcomes.append(StoreOutcome(InstanceToStore(Path()), "failed", reason=reason))
        summary = report.summary()
        audit.done(
            f"C-STORE into {peer.ae_title}: {summary['stored']} stored, "
            f"{summary['failed']} failed, {summary['decompressed']} decompressed",
            succeeded=summary["stored"],
            failed=summary["failed"],
        )
    return report, documents


@dataclass
class DeliveryResult:
    """What ``deliver_package`` did."""

    package_id: str
    report: StoreReport
    documents: int = 0

    def to_dict(self, *, with_uids: bool = True) -> dict[str, Any]:
        out = {"package": self.package_id, **self.report.to_dict(with_uids=with_uids)}
        out["documents_not_stored"] = self.documents
        return out


def deliver_package(
    package_id: str,
    settings: CallSettings,
    *,
    client: HubClient,
    home: LocalHome,
    parallel: int = 4,
    progress: Progress | None = None,
) -> DeliveryResult:
    """Receive a package (signature and hashes verified), then C-STORE it."""
    from emix_core import receive_package

    try:
        actor = str(client.me().get("facility") or "unknown")
    except Exception:  # the audit must not fail because the hub is unreachable
        actor = "unknown"
    with work_folder(home, "dimse-deliver") as folder:
        received = receive_package(package_id, folder, client=client, home=home, parallel=parallel)
        report, documents = store_folder(
            received.package, received.path, settings, home=home, actor=actor, progress=progress
        )
    return DeliveryResult(package_id, report, documents)


# --------------------------------------------------------------------------- gateway

#: Every setting of a ``[[destinations]]`` table of kind ``dimse``.
DESTINATION_SETTINGS = {
    "kind": '"dimse"',
    "name": "name shown in logs and status",
    "pacs": "the PACS, AET@HOST:PORT (required)",
    "calling_ae": "emix's AE title when calling the PACS (default EMIX)",
    "timeout": "seconds to wait for the PACS (default 60)",
    "max_pdu": "largest PDU received, bytes (default 262144)",
}


class DimseDestination:
    """Store every arriving package into the facility's PACS with C-STORE."""

    def __init__(self, settings: dict[str, Any], gateway: Gateway) -> None:
        unknown = sorted(set(settings) - set(DESTINATION_SETTINGS))
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r} in a dimse destination")
        self.name = str(settings["name"])
        self.gateway = gateway
        if "pacs" not in settings:
            raise ConfigError(f'dimse destination {self.name!r} needs pacs = "AET@HOST:PORT"')
        self.call = CallSettings(
            parse_peer(str(settings["pacs"])),
            calling_ae=check_ae_title(str(settings.get("calling_ae", "EMIX"))),
            timeout=float(settings.get("timeout", 60)),
            max_pdu=int(settings.get("max_pdu", 262144)),
        )

    def deliver(self, package: Package, path: Path) -> dict[str, Any]:
        """C-STORE the package; raise :class:`PeerUnavailable` to be retried.

        Instances the PACS refuses for good are reported and audited, not retried.
        """
        report, documents = store_folder(
            package, path, self.call, home=self.gateway.home, actor=f"gateway:{self.name}"
        )
        transient = [
            o for o in report.outcomes if o.code is not None and 0xA700 <= o.code <= 0xA7FF
        ]
        if transient:
            raise PeerUnavailable(
                f"the PACS {self.call.peer} is out of resources for {len(transient)} "
                "instances; will try again"
            )
        return {
            "pacs": str(self.call.peer),
            **report.to_dict(with_uids=False),
            "documents_not_stored": documents,
        }
