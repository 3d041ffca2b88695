"""What each complete file is, and which files form a package.

DICOM files are grouped by study; a study is ready when no new file of it arrived for
``settle_seconds`` and no file that might still belong to it is being written. Reports
and other documents go with the study they name (accession number, or a sidecar
``<document>.emix.toml`` giving ``accession_number`` or ``study_instance_uid``); a
document that names no study goes with the only study filed in or under its own folder,
else with the only study of the recipient's folder; when that is ambiguous, all the
studies and documents travel as one package ("sent with the batch").
"""

from __future__ import annotations

import tomllib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pluggy

from emix_core import InvalidInput, classify, hooks_for, is_valid_uid, sha256_file
from emix_folder_watch.files import SIDECAR_SUFFIX
from emix_folder_watch.journal import FileRow, digest

#: Largest sidecar read; larger is refused.
MAX_SIDECAR_BYTES = 64 * 1024
#: Largest document parsed to find its accession number.
MAX_REPORT_BYTES = 8 * 1024 * 1024
SIDECAR_KEYS = frozenset({"accession_number", "study_instance_uid"})


@dataclass
class Classified:
    """The journal columns of a complete file."""

    kind: str  # dicom, document, sidecar
    study: str | None = None
    accession: str | None = None
    identity: str | None = None
    document: str | None = None  # a sidecar's document (relative path)


def classify_file(path: Path, relative: str, pm: pluggy.PluginManager) -> Classified:
    """Recognise a complete file by content.

    :raises EmixError: not DICOM and not a supported document, truncated, malformed.
    :raises OSError: unreadable.
    """
    if path.name.endswith(SIDECAR_SUFFIX) and len(path.name) > len(SIDECAR_SUFFIX):
        return _sidecar(path, relative)
    media_type, instance = classify(path)
    if instance is not None:
        return Classified(
            "dicom",
            study=digest("study", instance.study_uid),
            accession=digest("accession", instance.accession_number.strip()),
            identity=digest("sop", instance.sop_instance_uid),
        )
    accession, study = _report_keys(path, media_type, pm)
    return Classified(
        "document",
        study=study,
        accession=accession,
        identity=digest("content", sha256_file(path)),
    )


def _sidecar(path: Path, relative: str) -> Classified:
    if path.stat().st_size > MAX_SIDECAR_BYTES:
        raise InvalidInput(f"the sidecar is larger than {MAX_SIDECAR_BYTES} bytes")
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidInput(f"the sidecar is not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - SIDECAR_KEYS)
    if unknown or not data:
        raise InvalidInput(
            'a sidecar gives accession_number = "..." and/or study_instance_uid = "..." '
            f"(found: {', '.join(unknown) or 'nothing'})"
        )
    uid = data.get("study_instance_uid")
    if uid is not None and not (isinstance(uid, str) and is_valid_uid(uid)):
        raise InvalidInput("study_instance_uid in the sidecar is not a valid DICOM UID")
    accession = data.get("accession_number")
    if accession is not None and not isinstance(accession, str):
        raise InvalidInput("accession_number in the sidecar must be a string")
    return Classified(
        "sidecar",
        study=digest("study", uid),
        accession=digest("accession", (accession or "").strip()),
        document=relative[: -len(SIDECAR_SUFFIX)],
    )


def _report_keys(
    path: Path, media_type: str, pm: pluggy.PluginManager
) -> tuple[str | None, str | None]:
    """The accession number and study a report names (HL7, CDA, FHIR, text), as digests."""
    if media_type == "application/pdf" or path.stat().st_size > MAX_REPORT_BYTES:
        return None, None
    try:
        report = hooks_for(pm).parse_report(path.read_bytes(), media_type)
    except Exception:  # a report no parser understands still travels, just unmatched
        return None, None
    accession = (getattr(report, "accession_number", "") or "").strip()
    study = (getattr(report, "study_instance_uid", "") or "").strip()
    return digest("accession", accession), digest("study", study)


# --------------------------------------------------------------------------- planning


@dataclass
class Unsettled:
    """A file still being written: its study is unknown until it is complete."""

    recipients: str
    path: str
    arrived: float


@dataclass
class Plan:
    """Packages to send now, and sidecars whose document never came."""

    batches: list[list[FileRow]] = field(default_factory=list)
    orphans: list[FileRow] = field(default_factory=list)


def plan_batches(
    pending: list[FileRow],
    unsettled: list[Unsettled],
    now: float,
    settle: float,
    max_wait: float,
) -> Plan:
    """Decide which pending files form packages now (pure: no I/O)."""
    plan = Plan()
    by_group: dict[str, list[FileRow]] = defaultdict(list)
    for row in pending:
        by_group[row.recipients].append(row)
    for recipients, rows in by_group.items():
        waiting = [u for u in unsettled if u.recipients == recipients]
        _plan_group(rows, waiting, now, settle, max_wait, plan)
    return plan


def _folder(path: str) -> str:
    return path.rpartition("/")[0]


def _is_within(folder: str, parent: str) -> bool:
    return folder == parent or folder.startswith(parent + "/")


def _plan_group(
    rows: list[FileRow],
    waiting: list[Unsettled],
    now: float,
    settle: float,
    max_wait: float,
    plan: Plan,
) -> None:
    def quiet(members: list[FileRow]) -> bool:
        last = max(r.arrived for r in members)
        return now - last >= settle and all(u.arrived >= last + settle for u in waiting)

    studies: dict[str, list[FileRow]] = defaultdict(list)
    documents = [r for r in rows if r.kind == "document"]
    for row in rows:
        if row.kind == "dicom":
            studies[row.study or ""].append(row)
    sidecars = {r.document: r for r in rows if r.kind == "sidecar"}
    document_paths = {d.path for d in documents}
    waiting_paths = {u.path for u in waiting}
    for sidecar in sidecars.values():
        lonely = sidecar.document not in document_paths | waiting_paths
        if lonely and quiet([sidecar]):
            plan.orphans.append(sidecar)

    keys = {
        study: {("s", study)} | {("a", r.accession) for r in members if r.accession}
        for study, members in studies.items()
    }
    folders = {study: {_folder(r.path) for r in members} for study, members in studies.items()}
    unmatched: list[FileRow] = []
    for document in documents:
        note = sidecars.get(document.path)
        wanted = {("a", document.accession)} if document.accession else set()
        wanted |= {("s", document.study)} if document.study else set()
        if note is not None:
            wanted |= {("a", note.accession)} if note.accession else set()
            wanted |= {("s", note.study)} if note.study else set()
        matches = [study for study, k in keys.items() if wanted & k]
        if not matches:  # the only study filed in or under the document's own folder
            here = _folder(document.path)
            matches = [s for s, f in folders.items() if any(_is_within(d, here) for d in f)]
        if len(matches) == 1:
            studies[matches[0]].append(document)
        else:
            unmatched.append(document)
        if note is not None:
            (studies[matches[0]] if len(matches) == 1 else unmatched).append(note)

    if len(studies) == 1 and unmatched:
        next(iter(studies.values())).extend(unmatched)
        unmatched = []
    if not studies:
        if unmatched and quiet(unmatched):
            plan.batches.append(unmatched)
        return
    if unmatched:
        everything = [r for members in studies.values() for r in members] + unmatched
        if quiet(everything):
            plan.batches.append(everything)
            return
        if now - min(r.arrived for r in unmatched) < max_wait:
            return  # wait for the whole drop to settle
    for members in studies.values():
        if quiet(members):
            plan.batches.append(members)
    if unmatched and quiet(unmatched):
        plan.batches.append(unmatched)
