"""emix as a Query/Retrieve SCU: C-FIND studies, then C-GET them (emix is the storage
SCP on the same association) or C-MOVE them to a storage SCP emix runs for the time of
the retrieval. Instances are written to files as their fragments arrive and kept
exactly as received; ``pull_and_send`` sends them as one package.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.status import code_to_category

from emix_core import (
    AuditAction,
    ConfigError,
    HubClient,
    LocalHome,
    NotFoundError,
    SendResult,
    audited_query,
    audited_transfer,
    send_paths,
)
from emix_dimse.delivery import work_folder
from emix_dimse.network import GuardedRequestHandler, configure_pynetdicom
from emix_dimse.scu import CallSettings, DimseError, PeerUnavailable, associate

__all__ = [
    "StudyMatch",
    "RetrieveResult",
    "PullResult",
    "find_studies",
    "retrieve",
    "pull_and_send",
]

#: Transfer syntaxes offered for each SOP class when retrieving with C-GET, one
#: presentation context each, so that the PACS sends every instance as it stored it.
GET_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.51",  # JPEG extended
    "1.2.840.10008.1.2.4.57",  # JPEG lossless
    "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE lossless
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
)
#: SOP classes asked for when the PACS does not say which a study holds.
COMMON_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT
    "1.2.840.10008.5.1.4.1.1.4",  # MR
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.1",  # CR
    "1.2.840.10008.5.1.4.1.1.1.1",  # DX
    "1.2.840.10008.5.1.4.1.1.6.1",  # US
    "1.2.840.10008.5.1.4.1.1.20",  # NM
    "1.2.840.10008.5.1.4.1.1.128",  # PET
    "1.2.840.10008.5.1.4.1.1.481.2",  # RT Dose
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
)


@dataclass
class StudyMatch:
    """One study the PACS listed (PHI: never log these values)."""

    study_uid: str
    patient_id: str = ""
    accession: str = ""
    instances: int | None = None
    sop_classes: list[str] = field(default_factory=list)


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _c_find(call: CallSettings, query: Dataset) -> list[Dataset]:
    model = StudyRootQueryRetrieveInformationModelFind
    assoc = associate(call, [build_context(model)])
    answers: list[Dataset] = []
    try:
        for status, identifier in assoc.send_c_find(query, model):
            if not status or "Status" not in status:
                raise PeerUnavailable(f"the DICOM node {call.peer} stopped answering C-FIND")
            category = code_to_category(int(status.Status))
            if category == "Pending" and identifier is not None:
                answers.append(identifier)
            elif category not in ("Pending", "Success"):
                raise DimseError(
                    f"the DICOM node {call.peer} refused C-FIND with status 0x{status.Status:04X}"
                )
    finally:
        if assoc.is_established:
            assoc.release()
    return answers


def find_studies(
    call: CallSettings, *, study: str | None, accession: str | None, patient_id: str | None
) -> list[StudyMatch]:
    """C-FIND (Study Root) for the studies matching one key; their SOP classes too."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study or ""
    query.AccessionNumber = accession or ""
    query.PatientID = patient_id or ""
    query.NumberOfStudyRelatedInstances = ""
    matches = []
    for answer in _c_find(call, query):
        uid = _text(answer, "StudyInstanceUID")
        if not uid:
            continue
        count = answer.get("NumberOfStudyRelatedInstances")
        matches.append(
            StudyMatch(
                uid,
                _text(answer, "PatientID"),
                _text(answer, "AccessionNumber"),
                int(count) if count not in (None, "") else None,
            )
        )
    for match in matches:
        images = Dataset()
        images.QueryRetrieveLevel = "IMAGE"
        images.StudyInstanceUID = match.study_uid
        images.SeriesInstanceUID = ""
        images.SOPInstanceUID = ""
        images.SOPClassUID = ""
        classes = {_text(a, "SOPClassUID") for a in _c_find(call, images)}
        match.sop_classes = sorted(c for c in classes if c)
    return matches


@dataclass
class RetrieveResult:
    """What a C-GET or C-MOVE brought in."""

    files: list[Path] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0
    failed: int = 0
    method: str = "C-GET"


class _Receiver:
    """Keeps every C-STORE sub-operation's data set, as received, in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.result = RetrieveResult()
        self._lock = threading.Lock()

    def on_store(self, event: Any) -> int:
        try:
            source = Path(event.dataset_path)
            target = self.folder / f"{secrets.token_hex(12)}.dcm"
            try:
                os.replace(source, target)
            except OSError:
                shutil.copyfile(source, target)
            size = target.stat().st_size
        except OSError:
            return 0xA700
        with self._lock:
            self.result.files.append(target)
            self.result.bytes += size
        return 0x0000


def _identifier(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid
    return ds


def _check(call: CallSettings, responses: Any, what: str) -> int:
    """Consume C-GET/C-MOVE responses; the number of failed sub-operations."""
    failed = 0
    last = None
    for status, _ in responses:
        if not status or "Status" not in status:
            raise PeerUnavailable(f"the DICOM node {call.peer} stopped answering {what}")
        last = status
    if last is None:
        raise PeerUnavailable(f"the DICOM node {call.peer} did not answer {what}")
    category = code_to_category(int(last.Status))
    failed = int(last.get("NumberOfFailedSuboperations", 0) or 0)
    if category not in ("Success", "Warning"):
        comment = str(last.get("ErrorComment", "") or "")[:200]
        raise DimseError(
            f"the DICOM node {call.peer} answered {what} with status 0x{last.Status:04X}"
            + (f" ({comment})" if comment else "")
        )
    return failed


def retrieve(
    call: CallSettings,
    studies: Sequence[StudyMatch],
    folder: Path,
    *,
    move_dest: str | None = None,
    move_port: int = 0,
    move_host: str = "0.0.0.0",
) -> RetrieveResult:
    """C-GET every study into ``folder`` (or C-MOVE it to ``move_dest``, served here on
    ``move_port`` for the time of the retrieval)."""
    receiver = _Receiver(folder)
    started = time.monotonic()
    if move_dest:
        receiver.result.method = "C-MOVE"
        _move(call, studies, receiver, move_dest, move_port, move_host)
    else:
        _get(call, studies, receiver)
    receiver.result.seconds = time.monotonic() - started
    return receiver.result


def _get(call: CallSettings, studies: Sequence[StudyMatch], receiver: _Receiver) -> None:
    model = StudyRootQueryRetrieveInformationModelGet
    for study in studies:
        classes = study.sop_classes or list(COMMON_CLASSES)
        # 127 contexts besides the C-GET one: as many syntaxes per class as fit
        per_class = max(1, min(len(GET_SYNTAXES), 127 // len(classes)))
        syntaxes = GET_SYNTAXES[:per_class]
        contexts = [build_context(model)]
        contexts += [build_context(c, t) for c in classes[:127] for t in syntaxes]
        roles = [build_role(c, scp_role=True) for c in classes[:127]]
        assoc = associate(
            call,
            contexts,
            ext_neg=roles,
            evt_handlers=[(evt.EVT_C_STORE, receiver.on_store)],
        )
        try:
            receiver.result.failed += _check(
                call, assoc.send_c_get(_identifier(study.study_uid), model), "C-GET"
            )
        finally:
            if assoc.is_established:
                assoc.release()


def _move(
    call: CallSettings,
    studies: Sequence[StudyMatch],
    receiver: _Receiver,
    move_dest: str,
    port: int,
    host: str,
) -> None:
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
    from pynetdicom.transport import ThreadedAssociationServer

    if not port:
        raise ConfigError("C-MOVE needs --move-port: the port the PACS sends to")
    configure_pynetdicom()
    ae = AE(ae_title=move_dest)
    ae.maximum_pdu_size = call.max_pdu
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = call.timeout
    ae.require_called_aet = True
    # only the PACS asked to move may store here during the retrieval
    ae.require_calling_aet = [call.peer.ae_title]
    ae.add_supported_context(Verification)
    try:
        server = ThreadedAssociationServer(
            ae,
            (host, port),
            move_dest,
            ae.supported_contexts,
            None,
            [(evt.EVT_C_STORE, receiver.on_store)],
            request_handler=GuardedRequestHandler,
        )
    except OSError as exc:
        raise ConfigError(f"cannot listen on port {port} for C-MOVE ({exc.strerror})") from exc
    ae._servers.append(server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    model = StudyRootQueryRetrieveInformationModelMove
    try:
        for study in studies:
            assoc = associate(call, [build_context(model)])
            try:
                receiver.result.failed += _check(
                    call,
                    assoc.send_c_move(_identifier(study.study_uid), move_dest, model),
                    "C-MOVE",
                )
            finally:
                if assoc.is_established:
                    assoc.release()
    finally:
        with contextlib.suppress(Exception):
            server.shutdown()
            server.server_close()
        thread.join(timeout=10)


# --------------------------------------------------------------------------- PACS → hub


@dataclass
class PullResult:
    """What ``pull_and_send`` did."""

    studies: int = 0
    retrieved: RetrieveResult = field(default_factory=RetrieveResult)
    sent: SendResult = field(default_factory=SendResult)

    def to_dict(self) -> dict[str, Any]:
        return self.sent.pulled_dict(
            self.studies,
            {
                "method": self.retrieved.method,
                "instances": len(self.retrieved.files),
                "bytes": self.retrieved.bytes,
                "failed": self.retrieved.failed,
                "seconds": round(self.retrieved.seconds, 3),
            },
        )


def pull_and_send(
    call: CallSettings,
    to: Sequence[str],
    *,
    study: str | None,
    accession: str | None,
    patient_id: str | None,
    client: HubClient,
    home: LocalHome,
    move_dest: str | None = None,
    move_port: int = 0,
    expires_days: int | None = None,
    parallel: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> PullResult:
    """C-FIND, then C-GET (or C-MOVE), then one package to ``to``; audited.

    :raises NotFoundError: no study matches.
    """
    try:
        actor = str(client.me().get("facility") or "unknown")
    except Exception:  # the audit must not fail because the hub is unreachable
        actor = "unknown"
    peer = call.peer
    keys = {
        k: v
        for k, v in (
            ("StudyInstanceUID", study),
            ("AccessionNumber", accession),
            ("PatientID", patient_id),
        )
        if v
    }
    with audited_query(
        home, actor=actor, peer=peer.host, query=keys, what=f"C-FIND on {peer.ae_title}"
    ) as audit:
        matches = find_studies(call, study=study, accession=accession, patient_id=patient_id)
        audit.found([m.study_uid for m in matches])
    if not matches:
        raise NotFoundError(f"no study on the DICOM node {peer} matches the query")
    result = PullResult(studies=len(matches))
    phi = {
        "studies": [m.study_uid for m in matches],
        "patients": sorted({m.patient_id for m in matches if m.patient_id}),
    }
    with work_folder(home, "dimse-send") as folder:
        with audited_transfer(
            home,
            action=AuditAction.CREATE,
            actor=actor,
            peer=peer.host,
            phi=phi,
            what=f"retrieval from {peer.ae_title}",
        ) as audit:
            result.retrieved = retrieved = retrieve(
                call, matches, folder, move_dest=move_dest, move_port=move_port
            )
            audit.done(
                f"{retrieved.method} from {peer.ae_title}: {len(retrieved.files)} "
                f"instances ({retrieved.bytes} bytes), {retrieved.failed} failed",
                succeeded=len(retrieved.files),
                failed=retrieved.failed,
            )
        if not retrieved.files:
            raise DimseError(f"the DICOM node {peer} found the studies but sent no instance")
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
