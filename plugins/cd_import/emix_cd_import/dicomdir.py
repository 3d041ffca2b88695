"""Reading a DICOMDIR that may be damaged or hostile.

pydicom parses the DICOMDIR dataset; the record tree is then walked here rather than
by :class:`pydicom.fileset.FileSet`, because a FileSet follows record offsets without
a guard: a DICOMDIR whose offsets loop hangs it, and one whose offsets point past the
end stops it with a ``KeyError``. Here every record is visited at most once, a bad
offset ends only its own branch (with a :class:`Problem`), and every ReferencedFileID is
checked before it is looked up on the medium.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

from emix_cd_import.media import Problem
from emix_core import UnsafePathError

__all__ = ["Reference", "DicomdirContent", "read_dicomdir", "file_id_path"]

MAX_COMPONENTS = 8
LEVELS = ("PATIENT", "STUDY", "SERIES")
PATIENT_KEYS = ("PatientID", "PatientName", "IssuerOfPatientID", "PatientBirthDate", "PatientSex")
STUDY_KEYS = ("StudyInstanceUID", "StudyDate", "StudyDescription", "AccessionNumber")
SERIES_KEYS = ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription")


@dataclass
class Reference:
    """One file the DICOMDIR names, with the patient, study and series records above it."""

    path: str
    record_type: str
    sop_instance_uid: str
    sop_class_uid: str
    patient: dict[str, str]
    study: dict[str, str]
    series: dict[str, str]


@dataclass
class DicomdirContent:
    references: list[Reference] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    records: int = 0


def file_id_path(value: Any) -> str:
    """A ReferencedFileID as a relative POSIX path, or :class:`UnsafePathError`.

    Refused: ``..`` or ``.`` components, empty components, absolute paths, separators
    or drive letters inside a component, NUL, and more than 8 components (PS3.10 8.2).
    """
    components = [value] if isinstance(value, str) else list(value or [])
    components = [str(c) for c in components]
    if not components or not "".join(components).strip():
        raise UnsafePathError("a DICOMDIR record names an empty file ID")
    if len(components) > MAX_COMPONENTS:
        raise UnsafePathError(
            f"a DICOMDIR file ID has {len(components)} components; at most 8 are allowed"
        )
    for component in components:
        component = component.strip()
        if component in ("", ".", ".."):
            raise UnsafePathError("a DICOMDIR file ID climbs out of the medium (..)")
        if "/" in component or "\\" in component or "\x00" in component:
            raise UnsafePathError("a DICOMDIR file ID holds a path separator")
        if ":" in component:
            raise UnsafePathError("a DICOMDIR file ID names a drive")
    return "/".join(c.strip() for c in components)


def _values(record: Any, keys: tuple[str, ...]) -> dict[str, str]:
    return {k: str(record.get(k, "") or "") for k in keys}


def read_dicomdir(data: bytes) -> DicomdirContent:
    """Every referenced file of a DICOMDIR, with the problems met on the way.

    An unreadable DICOMDIR gives no references and one ``dicomdir-unreadable`` problem:
    the caller then scans the medium instead.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    content = DicomdirContent()
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        sequence = list(ds.DirectoryRecordSequence)
        first = int(ds.get("OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity", 0) or 0)
    except (InvalidDicomError, AttributeError, ValueError, TypeError, EOFError, KeyError) as exc:
        content.problems.append(
            Problem(
                "dicomdir-unreadable",
                f"the DICOMDIR cannot be read ({type(exc).__name__}); the medium was scanned",
                "DICOMDIR",
            )
        )
        return content
    records = {int(r.seq_item_tell): r for r in sequence if getattr(r, "seq_item_tell", None)}
    content.records = len(records)
    if not first and records:
        first = min(records)
    visited: set[int] = set()
    reported: set[str] = set()

    def problem(code: str, message: str) -> None:
        if code not in reported:  # one line per kind of damage, not one per record
            reported.add(code)
            content.problems.append(Problem(code, message, "DICOMDIR"))

    def walk(offset: int, above: dict[str, Any], depth: int) -> None:
        while offset:
            if offset in visited:
                problem("dicomdir-loop", "DICOMDIR record offsets loop; the loop was cut")
                return
            record = records.get(offset)
            if record is None:
                problem(
                    "dicomdir-bad-offset",
                    "a DICOMDIR record offset points past the end or between records; "
                    "the records it leads to are lost",
                )
                return
            visited.add(offset)
            if depth > len(LEVELS) + 4:
                problem("dicomdir-too-deep", "DICOMDIR records are nested too deeply")
                return
            kind = str(record.get("DirectoryRecordType", "") or "").strip().upper()
            in_use = record.get("RecordInUseFlag", 0xFFFF)
            if kind in LEVELS:  # read once per record, not once per file below it
                keys = dict(zip(LEVELS, (PATIENT_KEYS, STUDY_KEYS, SERIES_KEYS), strict=True))
                here = {**above, kind: _values(record, keys[kind])}
            else:
                here = above
            if in_use != 0 and "ReferencedFileID" in record and kind not in LEVELS:
                _reference(record, kind, here)
            child = int(record.get("OffsetOfReferencedLowerLevelDirectoryEntity", 0) or 0)
            if child and in_use != 0:
                walk(child, here, depth + 1)
            offset = int(record.get("OffsetOfTheNextDirectoryRecord", 0) or 0)

    def _reference(record: Any, kind: str, above: dict[str, Any]) -> None:
        try:
            path = file_id_path(record.ReferencedFileID)
        except UnsafePathError as exc:
            content.problems.append(Problem("unsafe-path", exc.message, "DICOMDIR"))
            return
        content.references.append(
            Reference(
                path=path,
                record_type=kind,
                sop_instance_uid=str(record.get("ReferencedSOPInstanceUIDInFile", "") or ""),
                sop_class_uid=str(record.get("ReferencedSOPClassUIDInFile", "") or ""),
                patient=above.get("PATIENT") or dict.fromkeys(PATIENT_KEYS, ""),
                study=above.get("STUDY") or dict.fromkeys(STUDY_KEYS, ""),
                series=above.get("SERIES") or dict.fromkeys(SERIES_KEYS, ""),
            )
        )

    walk(first, {}, 0)
    orphans = [o for o, r in records.items() if o not in visited and "ReferencedFileID" in r]
    if orphans:
        content.problems.append(
            Problem(
                "dicomdir-orphans",
                f"{len(orphans)} DICOMDIR records are not reachable from the root; "
                "their files are found by scanning instead",
                "DICOMDIR",
            )
        )
    return content
