"""What is on a medium: patients, studies, series and instances, each file checked.

The DICOMDIR says where to look; each file it names is then read (header only) and must
be DICOM and hold the instance and the patient the DICOMDIR says. Files the DICOMDIR
does not name are scanned by content, so a medium without a DICOMDIR, or with a damaged
one, still gives up its good studies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from emix_cd_import.dicomdir import PATIENT_KEYS, SERIES_KEYS, STUDY_KEYS, read_dicomdir
from emix_cd_import.media import Limits, Medium, MediumFile, Problem, match_key
from emix_core import InvalidInput

__all__ = ["Catalog", "Instance", "build_catalog"]

HEADER_KEYS = (
    *PATIENT_KEYS,
    *STUDY_KEYS,
    *SERIES_KEYS,
    "SOPInstanceUID",
    "SOPClassUID",
)
#: Files of the PDI profile itself, never studies.
MEDIA_FILES = frozenset({"DICOMDIR", "INDEX.HTM", "README.TXT", "LOCKFILE"})


@dataclass
class Instance:
    """A DICOM instance found on the medium, described by its own header."""

    file: MediumFile
    header: dict[str, str]

    @property
    def sop_instance_uid(self) -> str:
        return self.header["SOPInstanceUID"]

    @property
    def study_uid(self) -> str:
        return self.header["StudyInstanceUID"]

    def patient(self) -> dict[str, str]:
        return {k: self.header.get(k, "") for k in PATIENT_KEYS}


@dataclass
class Catalog:
    """The result of reading a medium."""

    kind: str
    dicomdir: bool = False
    instances: list[Instance] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    programs: list[str] = field(default_factory=list)
    other_files: int = 0

    def patients(self) -> list[dict[str, Any]]:
        """Patients, their studies and series, with instance counts."""
        tree: dict[tuple[str, str], dict[str, Any]] = {}
        for instance in self.instances:
            h = instance.header
            patient = tree.setdefault(
                (h["PatientID"], h["PatientName"]),
                {"patient_id": h["PatientID"], "patient_name": h["PatientName"], "studies": {}},
            )
            study = patient["studies"].setdefault(
                h["StudyInstanceUID"],
                {
                    "study_uid": h["StudyInstanceUID"],
                    "date": h["StudyDate"],
                    "description": h["StudyDescription"],
                    "accession": h["AccessionNumber"],
                    "series": {},
                },
            )
            series = study["series"].setdefault(
                h["SeriesInstanceUID"],
                {
                    "series_uid": h["SeriesInstanceUID"],
                    "modality": h["Modality"],
                    "number": h["SeriesNumber"],
                    "description": h["SeriesDescription"],
                    "instances": 0,
                },
            )
            series["instances"] += 1
        out = []
        for patient in tree.values():
            studies = []
            for study in patient["studies"].values():
                series = list(study["series"].values())
                studies.append(
                    {**study, "series": series, "instances": sum(s["instances"] for s in series)}
                )
            out.append({**patient, "studies": studies})
        return out

    def to_dict(self) -> dict[str, Any]:
        patients = self.patients()
        return {
            "kind": self.kind,
            "dicomdir": self.dicomdir,
            "patients": patients,
            "counts": {
                "patients": len(patients),
                "studies": sum(len(p["studies"]) for p in patients),
                "series": sum(len(s["series"]) for p in patients for s in p["studies"]),
                "instances": len(self.instances),
                "other_files": self.other_files,
            },
            "programs": self.programs,
            "problems": [p.to_dict() for p in self.problems],
        }


def read_header(medium: Medium, file: MediumFile) -> dict[str, str] | None:
    """The header attributes of a DICOM file on the medium; ``None`` when it is not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with medium.open(file) as stream:
            ds = pydicom.dcmread(stream, stop_before_pixels=True, specific_tags=list(HEADER_KEYS))
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, OSError, InvalidInput):
        return None  # a damaged zip entry included
    header = {k: str(ds.get(k, "") or "").strip() for k in HEADER_KEYS}
    if not header["SOPInstanceUID"] or not header["StudyInstanceUID"]:
        return None
    return header


def _looks_like_dicom(medium: Medium, file: MediumFile) -> bool:
    if file.size < 132:
        return False
    try:
        with medium.open(file) as stream:
            return stream.read(132)[128:132] == b"DICM"
    except (OSError, InvalidInput):
        return False


def build_catalog(medium: Medium, limits: Limits | None = None) -> Catalog:
    """Read the medium's DICOMDIR (if any), check every file it names, scan the rest."""
    limits = limits or Limits()
    catalog = Catalog(kind=medium.kind, problems=list(medium.problems))
    catalog.programs = list(medium.programs)
    if medium.programs:
        catalog.problems.append(
            Problem(
                "programs",
                f"{len(medium.programs)} program or autorun files on the medium "
                "(a viewer?) were neither run nor copied",
            )
        )
    files = medium.by_key()
    seen: set[str] = set()
    referenced: set[str] = set()
    dicomdir = files.get("DICOMDIR")
    if dicomdir is not None:
        catalog.dicomdir = True
        if dicomdir.size > limits.max_dicomdir_bytes:
            catalog.problems.append(
                Problem("dicomdir-too-large", "the DICOMDIR is too large; the medium was scanned")
            )
            content = None
        else:
            with medium.open(dicomdir) as stream:
                content = read_dicomdir(stream.read(limits.max_dicomdir_bytes + 1))
        if content is not None:
            catalog.problems += content.problems
            for ref in content.references:
                key = match_key(ref.path)
                file = files.get(key)
                if file is None:
                    catalog.problems.append(
                        Problem(
                            "missing-file",
                            "a file the DICOMDIR names is not there",
                            medium.shown(ref.path),
                        )
                    )
                    continue
                referenced.add(key)
                header = read_header(medium, file)
                if header is None:
                    catalog.problems.append(
                        Problem(
                            "not-dicom",
                            "a file the DICOMDIR names is not DICOM",
                            medium.shown(file.path),
                        )
                    )
                    continue
                if (ref.sop_instance_uid and ref.sop_instance_uid != header["SOPInstanceUID"]) or (
                    ref.patient["PatientID"] and ref.patient["PatientID"] != header["PatientID"]
                ):
                    catalog.problems.append(
                        Problem(
                            "dicomdir-mismatch",
                            "the DICOMDIR lists a patient or instance the file does not hold; "
                            "the file was left out",
                            medium.shown(file.path),
                        )
                    )
                    continue
                _add(catalog, seen, file, header)
    for key, file in files.items():
        if key in referenced or key in MEDIA_FILES:
            continue
        if not _looks_like_dicom(medium, file):
            catalog.other_files += 1
            continue
        header = read_header(medium, file)
        if header is None:
            catalog.other_files += 1
            continue
        if catalog.dicomdir and header["SOPInstanceUID"] not in seen:
            catalog.problems.append(
                Problem(
                    "not-in-dicomdir",
                    "a DICOM file the DICOMDIR does not name",
                    medium.shown(file.path),
                )
            )
        _add(catalog, seen, file, header)
    return catalog


def _add(catalog: Catalog, seen: set[str], file: MediumFile, header: dict[str, str]) -> None:
    if header["SOPInstanceUID"] in seen:
        return
    seen.add(header["SOPInstanceUID"])
    catalog.instances.append(Instance(file, header))
