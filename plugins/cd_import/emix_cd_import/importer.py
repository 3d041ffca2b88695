"""Import a medium: check, reconcile the patient, then share it or store it into a PACS.

The good instances are copied (streamed) into a private staging folder, their patient
attributes are set to the local identity the ``emix_reconcile_patient`` hook answers
(the foreign id kept in *Other Patient IDs Sequence*; pixel data is never touched),
then the staging folder is sent with the core's ``send_paths`` or stored into a PACS
with STOW-RS. The staging folder is removed afterwards, whatever happened.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emix_cd_import.catalog import Catalog, Instance, build_catalog
from emix_cd_import.dicomweb import store_into_pacs
from emix_cd_import.media import Limits, Medium, Problem, open_medium
from emix_core import (
    AuditAction,
    AuditEvent,
    AuditOutcome,
    InvalidInput,
    LocalHome,
    hooks_for,
)

__all__ = ["ImportResult", "import_medium", "reconcile_file", "RECONCILABLE"]

#: Patient attributes a reconciliation may set.
RECONCILABLE = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex")
COPY_CHUNK = 1024 * 1024

Progress = Callable[[int, int], None]


@dataclass
class ImportResult:
    """What an import did."""

    catalog: Catalog
    imported: int = 0
    reconciled: int = 0
    package_id: str | None = None
    pacs: dict[str, Any] | None = None
    failed: list[Problem] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every instance found was imported and nothing on the medium was wrong."""
        blocking = [p for p in self.catalog.problems if p.code != "programs"]
        return bool(self.imported) and not blocking and not self.failed

    def to_dict(self) -> dict[str, Any]:
        inspection = self.catalog.to_dict()
        return {
            "kind": inspection["kind"],
            "counts": inspection["counts"],
            "imported": self.imported,
            "reconciled": self.reconciled,
            "package": self.package_id,
            "pacs": self.pacs,
            "programs": inspection["programs"],
            "problems": inspection["problems"] + [p.to_dict() for p in self.failed],
        }


def reconcile_file(path: Path, changes: dict[str, str]) -> None:
    """Write the local patient identity into one staged instance, in place.

    The foreign *Patient ID* (and its issuer) go into *Other Patient IDs Sequence*; every
    other element, pixel data included, is written back byte for byte.
    """
    import pydicom
    from pydicom.dataset import Dataset

    ds = pydicom.dcmread(path, defer_size="256 KB")
    old_id = str(ds.get("PatientID", "") or "")
    old_issuer = str(ds.get("IssuerOfPatientID", "") or "")
    new_id = changes.get("PatientID")
    if new_id is not None and new_id != old_id and old_id:
        other = Dataset()
        other.PatientID = old_id
        if old_issuer:
            other.IssuerOfPatientID = old_issuer
        other.TypeOfPatientID = "TEXT"
        existing = list(ds.get("OtherPatientIDsSequence", []))
        if not any(str(e.get("PatientID", "")) == old_id for e in existing):
            ds.OtherPatientIDsSequence = [*existing, other]
        if "IssuerOfPatientID" not in changes and old_issuer:
            del ds.IssuerOfPatientID  # the foreign issuer does not vouch for the local id
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    temporary = path.with_name(path.name + ".tmp")
    ds.save_as(temporary, enforce_file_format=True)
    os.replace(temporary, path)


def _identity_key(patient: dict[str, str]) -> tuple[str, ...]:
    return tuple(patient.get(k, "") for k in RECONCILABLE)


def _changes_for(
    home: LocalHome, instances: list[Instance], local_patient_id: str | None
) -> dict[tuple[str, ...], dict[str, str]]:
    """Ask the hook once per foreign patient; refuse an ambiguous ``--patient-id``."""
    patients = {_identity_key(i.patient()): i.patient() for i in instances}
    foreign_ids = {p["PatientID"] for p in patients.values()}
    if local_patient_id and len(foreign_ids) > 1:
        raise InvalidInput(
            f"the medium holds {len(foreign_ids)} patients; a local patient id applies to "
            "one patient only: import the patients one by one (or without --patient-id)"
        )
    hooks = hooks_for(home.pm)
    answers: dict[tuple[str, ...], dict[str, str]] = {}
    for key, patient in patients.items():
        answer = hooks.reconcile_patient(patient, local_patient_id, "cd")
        unknown = sorted(set(answer) - set(RECONCILABLE))
        if unknown:
            raise InvalidInput(
                f"a patient reconciliation plugin answered an unknown key: {unknown[0]}"
            )
        answers[key] = {k: str(v) for k, v in answer.items() if str(v) != patient.get(k, "")}
    return answers


def stage(
    medium: Medium, instances: list[Instance], folder: Path, progress: Progress | None
) -> list[tuple[Instance, Path]]:
    """Copy the instances' bytes into ``folder`` under generated names (never the medium's)."""
    staged = []
    total = sum(i.file.size for i in instances)
    done = 0
    for number, instance in enumerate(instances, start=1):
        target = folder / f"{number:06d}.dcm"
        with medium.open(instance.file) as source, open(target, "wb") as sink:
            shutil.copyfileobj(source, sink, COPY_CHUNK)
        staged.append((instance, target))
        done += instance.file.size
        if progress:
            progress(done, total)
    return staged


def import_medium(
    source: Path,
    *,
    home: LocalHome,
    to: list[str] | None = None,
    client: Any = None,
    pacs: Any = None,
    local_patient_id: str | None = None,
    limits: Limits | None = None,
    work_dir: Path | None = None,
    parallel: int = 4,
    progress: Progress | None = None,
) -> ImportResult:
    """Import the good studies of a medium; problems are reported, not fatal.

    :param to: recipient addresses (with ``client``): share through the hub.
    :param pacs: a :class:`emix_dicomweb.connection.PacsSettings`: store with STOW-RS.
    :raises InvalidInput: the source is not a medium, or the patient mapping is ambiguous.
    """
    from emix_core import send_paths

    with open_medium(source, limits) as medium:
        catalog = build_catalog(medium, limits)
        result = ImportResult(catalog)
        if not catalog.instances:
            return result
        changes = _changes_for(home, catalog.instances, local_patient_id)
        staging = Path(tempfile.mkdtemp(prefix="emix-cd-", dir=work_dir))
        try:
            staged = stage(medium, catalog.instances, staging, progress)
            medium.close()
            for instance, path in staged:
                change = changes.get(_identity_key(instance.patient()))
                if change:
                    reconcile_file(path, change)
                    result.reconciled += 1
            phi = {"studies": sorted({i.study_uid for i in catalog.instances})}
            home.audit(
                AuditEvent(
                    event_type="import",
                    action=AuditAction.CREATE,
                    outcome=AuditOutcome.SUCCESS,
                    actor="cd-import",
                    phi=phi,
                    detail=(
                        f"read {len(staged)} instances from a {catalog.kind} medium, "
                        f"{result.reconciled} reconciled to the local patient"
                    ),
                )
            )
            if pacs is not None:
                report = store_into_pacs(pacs, staged, progress=progress)
                result.pacs = report.summary()
                result.imported = report.count("stored") + report.count("already-there")
                for outcome in report.failed:
                    result.failed.append(Problem("pacs-refused", outcome.reason or "refused"))
            else:
                sent = send_paths(
                    [staging], list(to or []), client=client, home=home, parallel=parallel
                )
                result.package_id = sent.package_id
                result.imported = sent.items
                for failure in sent.failed:
                    result.failed.append(Problem("not-sent", failure.error))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return result
