"""The sending side: turn files and folders into one signed, sealed package on the hub.

DICOM is recognised by content and grouped by study; other documents (PDF, RTF, HL7,
CDA, FHIR, text) travel as attachments. A file that cannot be sent is reported with a
reason and the rest goes on. Files are streamed from disk; memory stays flat.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emix_core import crypto, frames
from emix_core.audit.transfer import audited_transfer
from emix_core.client.home import LocalHome
from emix_core.client.hub import HubClient
from emix_core.client.resume import ResumeStore, files_fingerprint, send_key
from emix_core.content.dicom import DicomInstance
from emix_core.content.documents import classify
from emix_core.content.layout import DICOM_MEDIA_TYPE
from emix_core.content.manifest_parts import new_part, part_hash
from emix_core.content.safe_open import open_regular
from emix_core.errors import EmixError, HubUnavailable, NotFoundError, PolicyRejected
from emix_core.model import AuditAction, Item, Package, Recipient, utcnow
from emix_core.plugins import hooks_for

MANIFEST_FORMAT = "emix-manifest/1"
SKIPPED_NAMES = frozenset({"DICOMDIR", ".DS_Store", "Thumbs.db", "desktop.ini"})

Progress = Callable[[int, int], None]


@dataclass
class FailedInput:
    """A file that was not sent, and why (no PHI in ``error``)."""

    path: Path
    error: str

    def to_dict(self) -> dict[str, str]:
        return {"path": str(self.path), "error": self.error}


@dataclass
class PreparedFile:
    path: Path
    media_type: str
    size: int
    instance: DicomInstance | None = None


@dataclass
class SendResult:
    """What ``send_paths`` did."""

    package_id: str | None = None
    items: int = 0
    studies: int = 0
    bytes: int = 0
    sent: list[Path] = field(default_factory=list)
    failed: list[FailedInput] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    resumed: bool = False
    resumed_items: int = 0
    #: where each ``--to`` address resolved: ``{"to", "facility", "email"}``
    recipients: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "package": self.package_id,
            "recipients": self.recipients,
            "items": self.items,
            "studies": self.studies,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "resumed": self.resumed,
            "resumed_items": self.resumed_items,
            "failed": [f.to_dict() for f in self.failed],
        }

    def pulled_dict(self, studies_found: int, retrieved: dict[str, Any]) -> dict[str, Any]:
        """The JSON of a pull from a PACS then this send (``emix dicomweb send``, ``emix
        dimse send``): the studies found, what was ``retrieved``, and each failed
        instance by its temporary copy's number-or-random name, never a path or UID."""
        return {
            **self.to_dict(),
            "failed": [{"instance": f.path.name, "error": f.error} for f in self.failed],
            "studies_found": studies_found,
            "retrieved": retrieved,
        }


def iter_files(paths: Iterable[Path], skipped: list[Path]) -> Iterable[Path]:
    """Regular files under the given paths, sorted; links are not followed into folders."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            for child in sorted(path.rglob("*")):
                if child.is_file() and not child.is_symlink():
                    if child.name in SKIPPED_NAMES:
                        skipped.append(child)
                    else:
                        yield child
        elif path.name in SKIPPED_NAMES:
            skipped.append(path)
        else:
            yield path


def prepare_file(path: Path) -> PreparedFile:
    """Classify one file (DICOM by content, or a known document); its hash comes later."""
    if path.is_symlink() or not path.is_file():
        raise EmixError("not a regular file (links and devices are not sent)")
    media_type, instance = classify(path)
    return PreparedFile(path, media_type, path.stat().st_size, instance)


def summarize_studies(prepared: Sequence[PreparedFile]) -> list[dict[str, Any]]:
    """Per-study summary for the manifest (PHI: only ever stored encrypted on the hub)."""
    studies: dict[str, dict[str, Any]] = {}
    for p in prepared:
        inst = p.instance
        if inst is None:
            continue
        study = studies.setdefault(
            inst.study_uid,
            {
                "study_uid": inst.study_uid,
                "patient_name": inst.patient_name,
                "patient_id": inst.patient_id,
                "accession_number": inst.accession_number,
                "study_date": inst.study_date,
                "study_description": inst.study_description,
                "study_time": inst.study_time,
                "study_id": inst.study_id,
                "referring_physician_name": inst.referring_physician_name,
                "patient_birth_date": inst.patient_birth_date,
                "patient_sex": inst.patient_sex,
                "specific_character_set": inst.specific_character_set,
                "modalities": [],
                "series_details": {},
                "series": set(),
                "instances": 0,
            },
        )
        study["instances"] += 1
        study["series"].add(inst.series_uid)
        study["series_details"].setdefault(
            inst.series_uid,
            {
                "series_uid": inst.series_uid,
                "modality": inst.modality,
                "series_number": inst.series_number,
                "series_description": inst.series_description,
                "series_date": inst.series_date,
                "series_time": inst.series_time,
            },
        )
        if inst.modality and inst.modality not in study["modalities"]:
            study["modalities"].append(inst.modality)
    for study in studies.values():
        study["series"] = len(study["series"])
        study["series_details"] = sorted(
            study["series_details"].values(), key=lambda s: s["series_uid"]
        )
    return list(studies.values())


def _item(item_id: int, p: PreparedFile) -> Item:
    inst = p.instance
    return Item(
        id=item_id,
        name=p.path.name,
        media_type=p.media_type,
        size=p.size,
        sha256="",  # known once uploaded: the file is hashed as it streams
        study_uid=inst.study_uid if inst else None,
        series_uid=inst.series_uid if inst else None,
        sop_instance_uid=inst.sop_instance_uid if inst else None,
        sop_class_uid=inst.sop_class_uid if inst else None,
        transfer_syntax_uid=inst.transfer_syntax_uid if inst else None,
        instance_number=inst.instance_number if inst else None,
        rows=inst.rows if inst else None,
        columns=inst.columns if inst else None,
        bits_allocated=inst.bits_allocated if inst else None,
        number_of_frames=inst.number_of_frames if inst else None,
    )


def _with_retry(action: Callable[[], Any], attempts: int = 4) -> Any:
    for attempt in range(attempts):
        try:
            return action()
        except HubUnavailable:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * 2**attempt)
    return None


def send_paths(
    paths: Sequence[Path],
    to: Sequence[str],
    *,
    client: HubClient,
    home: LocalHome,
    expires_days: int | None = None,
    parallel: int = 4,
    progress: Progress | None = None,
    on_package: Callable[[str, bool], None] | None = None,
    resume: bool = False,
    progressive: bool = False,
) -> SendResult:
    """Send every DICOM file and document under ``paths`` as one package to ``to``.

    With ``resume``, an earlier, interrupted send of the same request (same paths,
    recipients, expiry and hub, files unchanged) is resumed: its open package is reused
    and only the items the hub does not hold are uploaded. ``on_package(id, resumed)``
    is called once the package id is known.

    With ``progressive`` (not together with ``resume``; only above 16 MiB), each uploaded
    batch is signed as a manifest part (:mod:`emix_core.content.manifest_parts`) as soon
    as it is stored, so that a receiving gateway can take it while the rest still uploads.

    :raises EmixError: the package could not be created or sealed (nothing was sent).
        Individual bad files do not raise: they are listed in ``result.failed``.
    """
    started = time.monotonic()
    result = SendResult()
    files = list(iter_files([Path(p) for p in paths], result.skipped))
    prepared: list[PreparedFile] = []
    seen_sops: set[str] = set()
    # who we are, asked of the hub while the files are read (its answer also brings the
    # hub's audit checkpoint, which opens the local audit log)
    asking = ThreadPoolExecutor(max_workers=1)
    whoami = asking.submit(client.me) if files else None
    asking.shutdown(wait=False)
    with ThreadPoolExecutor(max_workers=max(parallel, 1)) as pool:
        futures = {pool.submit(prepare_file, path): path for path in files}
        for future in as_completed(futures):
            path = futures[future]
            try:
                p = future.result()
            except EmixError as exc:
                result.failed.append(FailedInput(path, exc.message))
                continue
            except OSError as exc:
                result.failed.append(FailedInput(path, f"cannot read the file ({exc.strerror})"))
                continue
            if p.instance is not None:
                if p.instance.sop_instance_uid in seen_sops:
                    result.skipped.append(path)
                    continue
                seen_sops.add(p.instance.sop_instance_uid)
            prepared.append(p)
    prepared.sort(key=lambda p: str(p.path))
    if not prepared:
        result.seconds = time.monotonic() - started
        return result

    assert whoami is not None
    sender = whoami.result()["facility"]
    items = [_item(i, p) for i, p in enumerate(prepared, start=1)]
    draft = Package(
        id="",
        sender=sender,
        recipients=[Recipient(t) for t in to],
        items=items,
        studies=summarize_studies(prepared),
    )
    hooks_for(home.pm).before_send(draft)
    home.register_key(client)
    store = ResumeStore(home.path)
    key = send_key(paths, to, expires_days, client.base)
    fingerprint = files_fingerprint([p.path for p in prepared])
    package_id, held = _resumable(client, store.load(key) if resume else None, fingerprint)
    resumed = package_id is not None
    # a small package goes in one batch anyway: parts would only delay its seal
    large = sum(p.size for p in prepared) > PROGRESSIVE_MIN_BYTES
    progressive = progressive and not resume and large
    if package_id is None:
        opened = _with_retry(lambda: client.open_package(list(to), expires_days=expires_days))
        package_id = opened["id"]
        result.recipients = opened.get("recipients", [])
        if resume:
            store.save(key, package_id, fingerprint)
    if on_package is not None:
        on_package(package_id, resumed)
    draft.id = package_id
    with audited_transfer(
        home,
        action=AuditAction.READ,
        actor=sender,
        package_id=package_id,
        phi={"studies": [s["study_uid"] for s in draft.studies]},
        what="sending the package to the hub",
        begin=f"sending {len(items)} items",
    ) as audit:
        by_id = {item.id: (item, p) for item, p in zip(items, prepared, strict=True)}
        kept = _already_held(by_id, held, result)
        todo = {i: v for i, v in by_id.items() if i not in {k.id for k in kept}}
        parts = PartWriter(client, home, package_id, sender) if progressive else None
        uploaded = kept + _upload(
            client,
            package_id,
            todo,
            result,
            parallel,
            progress,
            on_batch=parts.post if parts else None,
        )
        if not uploaded:
            audit.done("no item could be sent", succeeded=0, failed=len(by_id))
            return result
        uploaded.sort(key=lambda i: i.id)
        sent_sops = {i.sop_instance_uid for i in uploaded}
        studies = summarize_studies(
            [p for p in prepared if p.instance is None or p.instance.sop_instance_uid in sent_sops]
        )
        manifest = {
            "format": MANIFEST_FORMAT,
            "package": package_id,
            "sender": sender,
            "recipients": list(to),
            "created": utcnow().isoformat(),
            "items": [i.to_dict() for i in uploaded],
            "studies": studies,
        }
        if parts is not None and parts.count:
            manifest.update(parts=parts.count, chain=parts.chain)
        signed = crypto.sign_document(home.signing_key, manifest)
        answer = _with_retry(lambda: client.seal(package_id, signed))
        if answer.get("checkpoint"):
            home.keep_hub_checkpoint(client, answer["checkpoint"])
        audit.done(
            f"sent {len(uploaded)} items to {', '.join(to)}, {len(result.failed)} not sent",
            succeeded=len(uploaded),
            failed=len(result.failed),
            phi={
                "studies": [s["study_uid"] for s in studies],
                "patients": sorted({s["patient_id"] or "" for s in studies}),
            },
        )
    if resume:
        store.forget(key)
    result.package_id = package_id
    result.resumed = resumed
    result.items = len(uploaded)
    result.studies = len(studies)
    result.bytes = sum(i.size for i in uploaded)
    result.seconds = time.monotonic() - started
    return result


def _resumable(
    client: HubClient, state: dict[str, Any] | None, fingerprint: str
) -> tuple[str | None, dict[int, dict[str, Any]]]:
    """The open package of an earlier run of this send and what the hub holds of it."""
    if not state or state.get("files") != fingerprint:
        return None, {}
    try:
        return state["package_id"], client.uploaded(state["package_id"])
    except NotFoundError:  # sealed, aborted or expired meanwhile: start anew
        return None, {}


def _already_held(
    by_id: dict[int, tuple[Item, PreparedFile]],
    held: dict[int, dict[str, Any]],
    result: SendResult,
) -> list[Item]:
    """Items the hub holds with exactly this file's bytes (checked by hashing locally)."""
    kept: list[Item] = []
    for item_id, info in held.items():
        if item_id not in by_id:
            continue
        item, prepared = by_id[item_id]
        if info.get("size") != item.size:
            continue
        try:
            digest = crypto.sha256_file(prepared.path)
        except OSError:
            continue
        if digest == info.get("sha256"):
            item.sha256 = digest
            kept.append(item)
            result.sent.append(prepared.path)
            result.resumed_items += 1
    return kept


class PartWriter:
    """Signs and posts the manifest parts of a progressive package, in chain order."""

    def __init__(self, client: HubClient, home: LocalHome, package_id: str, sender: str):
        self.client = client
        self.home = home
        self.package_id = package_id
        self.sender = sender
        self.count = 0
        self.chain = ""

    def post(self, items: list[Item]) -> None:
        """Post one part listing ``items`` (stored on the hub already).

        A part that cannot be posted is not fatal: the items travel in the final manifest,
        and the recipient takes them at the seal as it would without parts.
        """
        if not items:
            return
        document = new_part(
            self.package_id,
            self.sender,
            self.count + 1,
            self.chain,
            [i.to_dict() for i in sorted(items, key=lambda i: i.id)],
        )
        signed = crypto.sign_document(self.home.signing_key, document)
        try:
            _with_retry(lambda: self.client.post_part(self.package_id, signed))
        except EmixError:
            # the chain would be ambiguous from here on: post no more parts
            self.post = lambda items: None  # type: ignore[method-assign]
            return
        self.count += 1
        self.chain = part_hash(signed)


#: Batches of a progressive send are smaller, and fewer at once, so that parts follow
#: each other closely.
PROGRESSIVE_BATCH_BYTES = 8 * 1024 * 1024
PROGRESSIVE_FIRST_BATCH_BYTES = 2 * 1024 * 1024
#: Packages up to this size are sent without parts.
PROGRESSIVE_MIN_BYTES = 16 * 1024 * 1024
PROGRESSIVE_PARALLEL = 2


def _upload(
    client: HubClient,
    package_id: str,
    by_id: dict[int, tuple[Item, PreparedFile]],
    result: SendResult,
    parallel: int,
    progress: Progress | None,
    *,
    on_batch: Callable[[list[Item]], None] | None = None,
) -> list[Item]:
    """Upload every item in parallel batches; a failing batch is retried item by item.

    :param on_batch: called, in batch order, with the items of each batch once stored.
    """
    advance = frames.ByteCounter(sum(item.size for item, _ in by_id.values()), progress)

    def send_batch(batch: list[Item]) -> tuple[dict[int, str], dict[int, str]]:
        outgoing = [
            frames.OutgoingItem(i.id, by_id[i.id][1].path, i.size, i.media_type) for i in batch
        ]
        try:
            return _with_retry(lambda: client.upload_batch(package_id, outgoing, advance))
        except (EmixError, OSError):
            return _one_by_one(batch)

    def _one_by_one(batch: list[Item]) -> tuple[dict[int, str], dict[int, str]]:
        stored: dict[int, str] = {}
        failed: dict[int, str] = {}
        for item in batch:
            path = by_id[item.id][1].path
            try:
                sha256 = crypto.sha256_file(path)
                with open_regular(path) as handle:
                    client.upload_item(
                        package_id,
                        item.id,
                        handle,
                        size=item.size,
                        sha256=sha256,
                        media_type=item.media_type,
                    )
                stored[item.id] = sha256
            except EmixError as exc:
                failed[item.id] = exc.message
            except OSError as exc:
                failed[item.id] = f"cannot read the file ({exc.strerror or exc})"
        return stored, failed

    uploaded: list[Item] = []
    items = [i for i, _ in by_id.values()]
    if on_batch is None:
        groups = frames.batches(items)
    else:  # a small first batch: the recipient starts as soon as possible
        first = frames.batches(items, PROGRESSIVE_FIRST_BATCH_BYTES)[:1] if items else []
        taken = len(first[0]) if first else 0
        groups = first + frames.batches(items[taken:], PROGRESSIVE_BATCH_BYTES)
    if on_batch is not None:  # parts follow one another instead of coming four at once
        parallel = min(parallel, PROGRESSIVE_PARALLEL)
    with ThreadPoolExecutor(max_workers=max(parallel, 1)) as pool:
        for stored, failed in pool.map(send_batch, groups):
            batch: list[Item] = []
            for item_id, sha256 in stored.items():
                item, prepared = by_id[item_id]
                item.sha256 = sha256
                batch.append(item)
                result.sent.append(prepared.path)
            for item_id, error in failed.items():
                result.failed.append(FailedInput(by_id[item_id][1].path, error))
            uploaded += batch
            if on_batch is not None:
                on_batch(batch)
    return uploaded


__all__ = ["send_paths", "SendResult", "FailedInput", "PolicyRejected", "DICOM_MEDIA_TYPE"]
