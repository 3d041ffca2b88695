"""A DICOMDIR for a received package folder, so that a viewer opens the folder directly.

The received layout (``DICOM/<study>/<series>/<instance>.dcm``, see
:func:`emix_core.content.layout.item_relative_path`) is kept as it is: importers and
scripts rely on it. PS3.10 File IDs, though, are at most 8 characters from ``A-Z 0-9 _``
per component (and DICOM toolkits crash or refuse longer ones), so the DICOMDIR at the
folder's root references a conformant tree of relative symbolic links next to it,
``DIRLINKS/PTnnnnnn/STnnnnnn/SEnnnnnn/IMnnnnnn``, each pointing at the received file: no
byte is stored twice, and ``emix send`` of a received folder skips the links. Records go
patient → study → series → one record per instance whose type follows its SOP class
(IMAGE, SR DOCUMENT, KEY OBJECT DOC, ENCAP DOC, PRESENTATION, RT …), built by pydicom's
File-set record creators.

Headers are read one instance at a time, large values deferred, so memory stays flat.
An instance whose header cannot be read is left out of the index (and counted); the
DICOMDIR never stops a delivery.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emix_core.content.disc import (
    EXPLICIT_VR_LITTLE,
    RECORD_KEYS,
    _dicomdir_bytes,
    _Instance,
    _instance_order,
    _Layout,
    _Patient,
    _record,
    _Series,
    _Study,
)
from emix_core.content.layout import DICOM_MEDIA_TYPE
from emix_core.model import Item

__all__ = [
    "DICOMDIR_NAME",
    "LINKS_FOLDER",
    "DicomdirResult",
    "leaf_record",
    "record_type_of",
    "write_received_dicomdir",
]

log = logging.getLogger("emix.dicomdir")

DICOMDIR_NAME = "DICOMDIR"
#: The folder of the links the DICOMDIR references (a conformant File ID component).
LINKS_FOLDER = "DIRLINKS"

#: SOP Class UID (or its prefix, ending in a dot) -> directory record type (PS3.3 F.5).
_RECORD_TYPES: tuple[tuple[str, str], ...] = (
    ("1.2.840.10008.5.1.4.1.1.88.59", "KEY OBJECT DOC"),
    ("1.2.840.10008.5.1.4.1.1.88.", "SR DOCUMENT"),
    ("1.2.840.10008.5.1.4.1.1.104.", "ENCAP DOC"),
    ("1.2.840.10008.5.1.4.1.1.11.", "PRESENTATION"),
    ("1.2.840.10008.5.1.4.1.1.481.2", "RT DOSE"),
    ("1.2.840.10008.5.1.4.1.1.481.3", "RT STRUCTURE SET"),
    ("1.2.840.10008.5.1.4.1.1.481.5", "RT PLAN"),
    ("1.2.840.10008.5.1.4.1.1.481.4", "RT TREAT RECORD"),
    ("1.2.840.10008.5.1.4.1.1.66", "RAW DATA"),
    ("1.2.840.10008.5.1.4.1.1.9.", "WAVEFORM"),
    ("1.2.840.10008.5.1.4.1.1.4.2", "SPECTROSCOPY"),
)


@dataclass
class DicomdirResult:
    """What the DICOMDIR indexes: instances listed, and instances left out."""

    path: Path | None
    indexed: int
    left_out: int


def record_type_of(sop_class_uid: str) -> str:
    """The directory record type for instances of a SOP class (IMAGE unless known)."""
    for uid, record_type in _RECORD_TYPES:
        if sop_class_uid == uid or (uid.endswith(".") and sop_class_uid.startswith(uid)):
            return record_type
    return "IMAGE"


def leaf_record(ds: Any, record_type: str) -> Any:
    """The lowest-level record, by pydicom's creator for that type when it can make one."""
    from pydicom.fileset import DIRECTORY_RECORDERS

    record = _record(record_type, {})
    creator = DIRECTORY_RECORDERS.get(record_type)
    if creator is not None:
        # a required key missing: the record still references the file
        with contextlib.suppress(ValueError, AttributeError, KeyError, TypeError):
            record.update(creator(ds))
    return record


def _read(path: Path) -> tuple[dict[str, str], str, Any]:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, defer_size=1024)
    header = {k: str(ds.get(k, "") or "") for k in RECORD_KEYS}
    meta = getattr(ds, "file_meta", None)
    syntax = str(getattr(meta, "TransferSyntaxUID", "") or EXPLICIT_VR_LITTLE)
    return header, syntax, leaf_record(ds, record_type_of(header["SOPClassUID"]))


def write_received_dicomdir(
    folder: Path, items: Iterable[tuple[Item, Path]], *, file_set_id: str = "EMIX"
) -> DicomdirResult:
    """Write ``folder/DICOMDIR`` indexing the DICOM items already written in ``folder``.

    :param folder: the package folder (still the staging folder: the DICOMDIR becomes
        visible with the rest, by the same rename).
    :param items: each item with the path it was written to, inside ``folder``.
    :returns: what was indexed; no DICOMDIR (``path`` None) when nothing could be.
    """
    folder = Path(folder)
    layout = _Layout()
    left_out = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # long File IDs, odd values: indexed all the same
        for item, path in items:
            if item.media_type != DICOM_MEDIA_TYPE:
                continue
            try:
                relative = path.relative_to(folder)
                header, syntax, leaf = _read(path)
            except Exception:  # unreadable header, outside the folder: leave it out
                left_out += 1
                continue
            if not (header["SOPClassUID"] and header["SOPInstanceUID"]):
                left_out += 1  # a cut or odd file: nothing a viewer could open by the index
                continue
            patient_key = header["PatientID"] + "\x00" + header["PatientName"]
            patient = layout.patients.setdefault(patient_key, _Patient(patient_key, header))
            study_uid = header["StudyInstanceUID"] or item.study_uid or ""
            study = patient.studies.setdefault(study_uid, _Study(study_uid, header))
            series_uid = header["SeriesInstanceUID"] or item.series_uid or ""
            series = study.series.setdefault(series_uid, _Series(series_uid, header))
            instance = _Instance(item, _no_opener, header, syntax, relative.parts, leaf)
            series.instances.append(instance)
        indexed = sum(1 for _ in layout.instances())
        if not indexed:
            return DicomdirResult(None, 0, left_out)
        target = folder / DICOMDIR_NAME
        try:
            _link(folder, layout)
            data = _dicomdir_bytes(layout, file_set_id)
            with open(target, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:  # no half index: the folder stays as received
            shutil.rmtree(folder / LINKS_FOLDER, ignore_errors=True)
            target.unlink(missing_ok=True)
            raise
    return DicomdirResult(target, indexed, left_out)


def _link(folder: Path, layout: _Layout) -> None:
    """Give every instance its conformant File ID, a relative link to the received file."""
    for p, patient in enumerate(layout.patients.values(), start=1):
        for s, study in enumerate(patient.studies.values(), start=1):
            for e, series in enumerate(study.series.values(), start=1):
                series.instances.sort(key=_instance_order)
                for i, instance in enumerate(series.instances, start=1):
                    received = folder.joinpath(*instance.file_id)
                    file_id = (LINKS_FOLDER, f"PT{p:06d}", f"ST{s:06d}", f"SE{e:06d}", f"IM{i:06d}")
                    link = folder.joinpath(*file_id)
                    link.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(os.path.relpath(received, link.parent), link)
                    instance.file_id = file_id


def _no_opener() -> Any:  # pragma: no cover - the files are read by path here
    raise RuntimeError("received instances are read from their path")
