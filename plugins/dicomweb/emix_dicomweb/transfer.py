"""The two jobs of the adapter: PACS → hub (``send``) and hub → PACS (``deliver``).

Both stream through a private temporary folder inside the facility's home, removed
afterwards; both write audit events (DICOM PS3.15: Query, Begin Transferring, DICOM
Instances Transferred) with PHI only in the event's ``phi``.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emix_core import (
    DICOM_MEDIA_TYPE,
    AuditAction,
    HubClient,
    Item,
    LocalHome,
    NotFoundError,
    Package,
    SendResult,
    audited_query,
    audited_transfer,
    send_paths,
)
from emix_dicomweb.connection import PacsConnection, PacsError
from emix_dicomweb.query import SERIES_UID, StudyMatch, _call, find_studies, value
from emix_dicomweb.retrieve import Retrieval, RetrieveResult, retrieve_all
from emix_dicomweb.store import InstanceToStore, StoreReport, StoreSettings, store_instances

__all__ = [
    "DeliveryResult",
    "PacsSendResult",
    "deliver_package",
    "instances_in_folder",
    "pull_and_send",
    "retrieve_studies",
    "store_package_folder",
    "work_folder",
]

Progress = Callable[[int, int], None]
Sender = Callable[[list[Path], list[str]], SendResult]


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


def _actor(client: HubClient) -> str:
    try:
        me = client.me()
    except Exception:  # the audit must not fail because the hub is unreachable
        return "unknown"
    return str(me.get("email") or me.get("facility") or "unknown")


# --------------------------------------------------------------------------- PACS → hub


@dataclass
class PacsSendResult:
    """What ``pull_and_send`` did."""

    studies: int = 0
    retrieved: RetrieveResult = field(default_factory=RetrieveResult)
    sent: SendResult = field(default_factory=SendResult)

    def to_dict(self) -> dict[str, Any]:
        return self.sent.pulled_dict(
            self.studies,
            {
                "instances": len(self.retrieved.files),
                "bytes": self.retrieved.bytes,
                "seconds": round(self.retrieved.seconds, 3),
            },
        )


def query_studies(
    conn: PacsConnection, filters: dict[str, str], *, home: LocalHome, actor: str
) -> list[StudyMatch]:
    """QIDO-RS for studies, audited as a Query (the filters and results are PHI)."""
    with audited_query(
        home,
        actor=actor,
        peer=conn.host,
        query=filters,
        what=f"QIDO-RS study query on PACS {conn.host}",
    ) as audit:
        matches = find_studies(conn, filters)
        audit.found([m.study_uid for m in matches])
    return matches


def retrieve_studies(
    conn: PacsConnection,
    studies: Sequence[StudyMatch],
    folder: Path,
    *,
    home: LocalHome,
    actor: str,
    parallel: int = 2,
    retrievals: Sequence[Retrieval] | None = None,
) -> RetrieveResult:
    """WADO-RS every series of the studies (or the given retrievals) into ``folder``."""
    if retrievals is None:
        retrievals = []
        for study in studies:

            def series_of(uid: str = study.study_uid) -> Any:
                return conn.qido().search_for_series(study_instance_uid=uid, fields=[SERIES_UID])

            rows = _call(conn, "QIDO-RS (series)", series_of)
            series = sorted({s for row in rows if isinstance(s := value(row, SERIES_UID), str)})
            retrievals += [Retrieval(study.study_uid, s) for s in series] or [
                Retrieval(study.study_uid)
            ]
    phi = {
        "studies": [s.study_uid for s in studies],
        "patients": sorted({s.patient_id for s in studies if s.patient_id}),
    }
    with audited_transfer(
        home,
        action=AuditAction.CREATE,
        actor=actor,
        peer=conn.host,
        phi=phi,
        what=f"WADO-RS retrieval from PACS {conn.host}",
    ) as audit:
        result = retrieve_all(conn, retrievals, folder, parallel=parallel)
        audit.done(
            f"retrieved {len(result.files)} instances ({result.bytes} bytes) from PACS "
            f"{conn.host} with WADO-RS"
        )
    return result


def pull_and_send(
    conn: PacsConnection,
    filters: dict[str, str],
    to: Sequence[str],
    *,
    client: HubClient,
    home: LocalHome,
    expires_days: int | None = None,
    parallel: int = 4,
    retrieve_parallel: int = 2,
    progress: Progress | None = None,
    send: Sender | None = None,
) -> PacsSendResult:
    """Find studies with QIDO-RS, retrieve them with WADO-RS, send them as one package.

    :param send: how to send the retrieved folder (default: :func:`send_paths` with
        ``client`` and ``home``); the gateway passes its own journaled sender.
    :raises NotFoundError: no study matches.
    :raises PacsError: the PACS refused or stayed unreachable.
    """
    actor = _actor(client)
    matches = query_studies(conn, filters, home=home, actor=actor)
    if not matches:
        raise NotFoundError(f"no study on the PACS at {conn.host} matches the query")
    result = PacsSendResult(studies=len(matches))
    with work_folder(home, "dicomweb-send") as folder:
        result.retrieved = retrieve_studies(
            conn, matches, folder, home=home, actor=actor, parallel=retrieve_parallel
        )
        if not result.retrieved.files:
            raise PacsError(f"the PACS at {conn.host} listed the studies but sent no instance")
        if send is not None:
            result.sent = send([folder], list(to))
        else:
            result.sent = send_paths(
                [folder],
                list(to),
                client=client,
                home=home,
                expires_days=expires_days,
                parallel=parallel,
                progress=progress,
            )
    return result


# --------------------------------------------------------------------------- hub → PACS


def instances_in_folder(
    items: Sequence[Item], folder: Path
) -> tuple[list[InstanceToStore], list[Item]]:
    """The DICOM instances of a received package folder, and the other items (documents)."""
    from emix_core import item_relative_path

    instances: list[InstanceToStore] = []
    documents: list[Item] = []
    for item in items:
        if item.media_type != DICOM_MEDIA_TYPE:
            documents.append(item)
            continue
        path = folder / item_relative_path(item)
        instances.append(
            InstanceToStore(path, item.sop_instance_uid or "", item.study_uid or "", item.id)
        )
    return instances, documents


def keep_failed(home: LocalHome, package_id: str, report: StoreReport) -> Path | None:
    """Copy instances the PACS refused for good to ``failed/``, each with its reason."""
    refused = [o for o in report.failed if not o.transient and o.instance.path.exists()]
    if not refused:
        return None
    folder = home.path / "failed" / f"dicomweb-{package_id}"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    for outcome in refused:
        name = f"item-{outcome.instance.item_id or 0:06d}.dcm"
        shutil.copyfile(outcome.instance.path, folder / name)
        (folder / f"{name}.error.txt").write_text(
            f"not stored into the PACS: {outcome.reason}\n", "utf-8"
        )
    return folder


def store_package_folder(
    package: Package,
    folder: Path,
    conn: PacsConnection,
    *,
    home: LocalHome,
    actor: str,
    settings: StoreSettings | None = None,
    progress: Progress | None = None,
) -> tuple[StoreReport, int]:
    """STOW-RS the DICOM instances of a received package folder; audit the transfer.

    :returns: the report and the number of non-DICOM items (documents) left out.
    """
    instances, documents = instances_in_folder(package.items, folder)
    with audited_transfer(
        home,
        action=AuditAction.READ,
        actor=actor,
        peer=conn.host,
        package_id=package.id,
        phi={"studies": sorted({i.study_uid for i in instances if i.study_uid})},
        what=f"STOW-RS into PACS {conn.host}",
        begin=f"storing {len(instances)} instances into PACS {conn.host} with STOW-RS",
    ) as audit:
        report = store_instances(conn, instances, settings, progress=progress)
        summary = report.summary()
        audit.done(
            f"STOW-RS into PACS {conn.host}: {summary['stored']} stored, "
            f"{summary['already_there']} already there, {summary['failed']} failed",
            succeeded=len(instances) - summary["failed"],
            failed=summary["failed"],
        )
    return report, len(documents)


@dataclass
class DeliveryResult:
    """What ``deliver_package`` did."""

    package_id: str
    report: StoreReport
    documents: int = 0
    kept: Path | None = None

    def to_dict(self, *, with_uids: bool = True) -> dict[str, Any]:
        out = {"package": self.package_id, **self.report.to_dict(with_uids=with_uids)}
        out["documents_not_stored"] = self.documents
        if self.kept:
            out["failed_folder"] = str(self.kept)
        return out


def deliver_package(
    package_id: str,
    conn: PacsConnection,
    *,
    client: HubClient,
    home: LocalHome,
    settings: StoreSettings | None = None,
    parallel: int = 4,
    progress: Progress | None = None,
) -> DeliveryResult:
    """Receive a package (signature and hashes verified), then STOW-RS it into the PACS.

    Delivering the same package twice is harmless: what the PACS already lists is
    reported as ``already-there`` and not sent again.
    """
    from emix_core import receive_package

    actor = _actor(client)
    with work_folder(home, "dicomweb-deliver") as folder:
        received = receive_package(package_id, folder, client=client, home=home, parallel=parallel)
        package = received.package
        report, documents = store_package_folder(
            package,
            received.path,
            conn,
            home=home,
            actor=actor,
            settings=settings,
            progress=progress,
        )
        kept = keep_failed(home, package_id, report)
    return DeliveryResult(package_id, report, documents, kept)
