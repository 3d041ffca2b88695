"""A package as IHE PDI media: a folder or an ISO 9660 image ready to burn.

The layout is the one DICOM PS3.12 (General Purpose CD-R) and IHE Portable Data for
Imaging ask for, and that every viewer and PACS import station reads:

* ``DICOMDIR`` at the root, listing patients, studies, series and instances;
* the instances under ``DICOM/PTnnnnnn/STnnnnnn/SEnnnnnn/IMnnnnnn``: names of at most 8
  characters from ``A-Z 0-9 _``, never derived from a UID or a sender's file name;
* reports and attachments under ``DOCS/`` with 8.3 names;
* ``INDEX.HTM`` (what is on the disc, in a browser) and ``README.TXT`` (the same, in
  plain words). Nothing is executable and nothing starts by itself.

The ISO is plain ISO 9660 Level 1 (no Joliet, no Rock Ridge), as PS3.12 requires. Item
bytes are never held in memory: each is opened when the image reaches it and closed
after, so a study of several GB is written with flat memory and few open files.
"""

from __future__ import annotations

import html
import io
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from emix_core.content.layout import DICOM_MEDIA_TYPE
from emix_core.errors import IntegrityError, InvalidInput
from emix_core.model import Item

__all__ = ["write_pdi_folder", "write_pdi_iso", "Entry"]

#: An item of a package and a callable opening a readable binary stream of its bytes.
Entry = tuple[Item, Callable[[], BinaryIO]]

COPY_CHUNK = 1024 * 1024
EXPLICIT_VR_LITTLE = "1.2.840.10008.1.2.1"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
#: Header attributes read from each instance for its DICOMDIR records.
RECORD_KEYS = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "StudyID",
    "AccessionNumber",
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "InstanceNumber",
    "SOPClassUID",
    "SOPInstanceUID",
)


@dataclass
class _Instance:
    item: Item
    opener: Callable[[], BinaryIO]
    header: dict[str, str]
    transfer_syntax: str
    file_id: tuple[str, ...] = ()
    #: a ready lowest-level record (SR DOCUMENT, ENCAP DOC, ...); IMAGE when none
    leaf: Any = None


@dataclass
class _Series:
    uid: str
    header: dict[str, str]
    instances: list[_Instance] = field(default_factory=list)


@dataclass
class _Study:
    uid: str
    header: dict[str, str]
    series: dict[str, _Series] = field(default_factory=dict)


@dataclass
class _Patient:
    key: str
    header: dict[str, str]
    studies: dict[str, _Study] = field(default_factory=dict)


@dataclass
class _Document:
    item: Item
    opener: Callable[[], BinaryIO]
    file_id: tuple[str, ...]


@dataclass
class _Layout:
    patients: dict[str, _Patient] = field(default_factory=dict)
    documents: list[_Document] = field(default_factory=list)

    def instances(self) -> Iterable[_Instance]:
        for patient in self.patients.values():
            for study in patient.studies.values():
                for series in study.series.values():
                    yield from series.instances


# --------------------------------------------------------------------------- layout


def _read_header(opener: Callable[[], BinaryIO]) -> tuple[dict[str, str], str, Any]:
    """The record attributes, transfer syntax and lowest-level directory record of one
    instance (pixel data not read, large values deferred)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from emix_core.content.dicomdir import leaf_record, record_type_of

    try:
        with opener() as stream:
            ds = pydicom.dcmread(stream, stop_before_pixels=True, defer_size=1024)
            header = {k: str(ds.get(k, "") or "") for k in RECORD_KEYS}
            leaf = leaf_record(ds, record_type_of(header["SOPClassUID"]))
    except (InvalidDicomError, EOFError, ValueError) as exc:
        raise InvalidInput("an item marked as DICOM cannot be read as DICOM") from exc
    meta = getattr(ds, "file_meta", None)
    syntax = str(getattr(meta, "TransferSyntaxUID", "") or EXPLICIT_VR_LITTLE)
    return header, syntax, leaf


def _extension(name: str) -> str:
    suffix = PurePosixPath(name).suffix.upper().lstrip(".")
    suffix = re.sub(r"[^A-Z0-9]", "", suffix)[:3]
    return suffix


def _plan(entries: Iterable[Entry]) -> _Layout:
    layout = _Layout()
    for item, opener in entries:
        if item.media_type != DICOM_MEDIA_TYPE:
            number = len(layout.documents) + 1
            extension = _extension(item.name)
            name = f"DOC{number:05d}" + (f".{extension}" if extension else "")
            layout.documents.append(_Document(item, opener, ("DOCS", name)))
            continue
        header, syntax, leaf = _read_header(opener)
        patient_key = header["PatientID"] + "\x00" + header["PatientName"]
        patient = layout.patients.setdefault(patient_key, _Patient(patient_key, header))
        study_uid = header["StudyInstanceUID"] or item.study_uid or ""
        study = patient.studies.setdefault(study_uid, _Study(study_uid, header))
        series_uid = header["SeriesInstanceUID"] or item.series_uid or ""
        series = study.series.setdefault(series_uid, _Series(series_uid, header))
        series.instances.append(_Instance(item, opener, header, syntax, leaf=leaf))
    if len(layout.patients) > 999_999:
        raise InvalidInput("too many patients for one disc")
    for p, patient in enumerate(layout.patients.values(), start=1):
        for s, study in enumerate(patient.studies.values(), start=1):
            for e, series in enumerate(study.series.values(), start=1):
                series.instances.sort(key=_instance_order)
                for i, instance in enumerate(series.instances, start=1):
                    instance.file_id = (
                        "DICOM",
                        f"PT{p:06d}",
                        f"ST{s:06d}",
                        f"SE{e:06d}",
                        f"IM{i:06d}",
                    )
    return layout


def _instance_order(instance: _Instance) -> tuple[int, int]:
    return _number(instance.header["InstanceNumber"]), instance.item.id


def _number(value: str) -> int:
    try:
        return int(float(value))
    except ValueError:
        return 0


# --------------------------------------------------------------------------- DICOMDIR


def _record(record_type: str, values: dict[str, Any]) -> Any:
    from pydicom.dataset import Dataset

    record = Dataset()
    record.OffsetOfTheNextDirectoryRecord = 0
    record.RecordInUseFlag = 0xFFFF
    record.OffsetOfReferencedLowerLevelDirectoryEntity = 0
    record.DirectoryRecordType = record_type
    for keyword, value in values.items():
        setattr(record, keyword, value)
    return record


def _dicomdir_bytes(layout: _Layout, file_set_id: str) -> bytes:
    """The DICOMDIR; offsets are set in a second pass (UL values keep the length fixed)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID

    from emix_core.content.uids import new_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(MEDIA_STORAGE_DIRECTORY)
    meta.MediaStorageSOPInstanceUID = UID(new_uid())  # under the organisation's root
    meta.TransferSyntaxUID = UID(EXPLICIT_VR_LITTLE)
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.FileSetID = file_set_id
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    records: list[Any] = []
    # (record index, index of its first child, index of its next sibling)
    links: list[list[int | None]] = []

    def add(record: Any) -> int:
        records.append(record)
        links.append([None, None])
        return len(records) - 1

    def chain(indexes: list[int]) -> None:
        for a, b in zip(indexes, indexes[1:], strict=False):
            links[a][1] = b

    roots: list[int] = []
    for patient in layout.patients.values():
        h = patient.header
        p = add(_record("PATIENT", {"PatientID": h["PatientID"], "PatientName": h["PatientName"]}))
        roots.append(p)
        study_indexes: list[int] = []
        for study in patient.studies.values():
            h = study.header
            values: dict[str, Any] = {
                "StudyDate": h["StudyDate"],
                "StudyTime": h["StudyTime"],
                "StudyDescription": h["StudyDescription"],
                "StudyInstanceUID": study.uid,
                "StudyID": h["StudyID"],
                "AccessionNumber": h["AccessionNumber"],
            }
            s = add(_record("STUDY", values))
            study_indexes.append(s)
            series_indexes: list[int] = []
            for series in study.series.values():
                h = series.header
                values = {
                    "Modality": h["Modality"] or "OT",
                    "SeriesInstanceUID": series.uid,
                    "SeriesNumber": h["SeriesNumber"] or "0",
                }
                e = add(_record("SERIES", values))
                series_indexes.append(e)
                image_indexes: list[int] = []
                for instance in series.instances:
                    values = {
                        "ReferencedFileID": list(instance.file_id),
                        "ReferencedSOPClassUIDInFile": instance.header["SOPClassUID"],
                        "ReferencedSOPInstanceUIDInFile": instance.header["SOPInstanceUID"],
                        "ReferencedTransferSyntaxUIDInFile": instance.transfer_syntax,
                        "InstanceNumber": instance.header["InstanceNumber"] or "0",
                    }
                    if instance.leaf is not None:
                        leaf = instance.leaf
                        for keyword, value in values.items():
                            if keyword != "InstanceNumber" or keyword not in leaf:
                                setattr(leaf, keyword, value)
                        image_indexes.append(add(leaf))
                    else:
                        image_indexes.append(add(_record("IMAGE", values)))
                links[e][0] = image_indexes[0] if image_indexes else None
                chain(image_indexes)
            links[s][0] = series_indexes[0] if series_indexes else None
            chain(series_indexes)
        links[p][0] = study_indexes[0] if study_indexes else None
        chain(study_indexes)
    chain(roots)
    ds.DirectoryRecordSequence = records

    def encode() -> bytes:
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        return buffer.getvalue()

    first = encode()
    parsed = pydicom.dcmread(io.BytesIO(first))
    tells = [r.seq_item_tell for r in parsed.DirectoryRecordSequence]
    for index, (child, sibling) in enumerate(links):
        records[index].OffsetOfReferencedLowerLevelDirectoryEntity = (
            tells[child] if child is not None else 0
        )
        records[index].OffsetOfTheNextDirectoryRecord = tells[sibling] if sibling is not None else 0
    if roots:
        ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = tells[roots[0]]
        ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = tells[roots[-1]]
    second = encode()
    if len(second) != len(first):  # pragma: no cover - UL values have a fixed length
        raise IntegrityError("the DICOMDIR changed length while its offsets were set")
    return second


# --------------------------------------------------------------------------- texts


def _studies(layout: _Layout) -> list[tuple[_Patient, _Study]]:
    return [(p, s) for p in layout.patients.values() for s in p.studies.values()]


def _date(value: str) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if re.fullmatch(r"\d{8}", value) else value


def _readme(layout: _Layout) -> str:
    lines = [
        "This disc holds medical images in the DICOM format, with a DICOMDIR index,",
        "as described by the IHE Portable Data for Imaging (PDI) profile.",
        "",
        "To look at the images, open them with any DICOM viewer, or import the disc",
        "into a PACS. INDEX.HTM lists what is on the disc and opens in a web browser.",
        "Nothing on this disc runs by itself, and it holds no program.",
        "",
        "What is on the disc:",
    ]
    for patient, study in _studies(layout):
        count = sum(len(s.instances) for s in study.series.values())
        description = study.header["StudyDescription"] or "study"
        lines.append(
            f"- {patient.header['PatientName'].replace('^', ' ').strip() or 'unnamed patient'}: "
            f"{description}, {_date(study.header['StudyDate']) or 'date unknown'}, "
            f"{len(study.series)} series, {count} images"
        )
    for document in layout.documents:
        lines.append(f"- document {'/'.join(document.file_id)}: {document.item.media_type}")
    lines += ["", "Folders:", "  DICOMDIR   the index of the images", "  DICOM/     the images"]
    if layout.documents:
        lines.append("  DOCS/      reports and other documents")
    return "\r\n".join(lines) + "\r\n"


def _index_html(layout: _Layout) -> str:
    rows = []
    for patient, study in _studies(layout):
        for series in study.series.values():
            rows.append(
                "<tr>"
                + "".join(
                    f"<td>{html.escape(v)}</td>"
                    for v in (
                        patient.header["PatientName"].replace("^", " ").strip(),
                        _date(study.header["StudyDate"]),
                        study.header["StudyDescription"],
                        series.header["Modality"],
                        series.header["SeriesDescription"],
                        str(len(series.instances)),
                    )
                )
                + "</tr>"
            )
    docs = "".join(
        f'<li><a href="{"/".join(d.file_id)}">{html.escape(d.item.media_type)}</a></li>'
        for d in layout.documents
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>Medical images (DICOM)</title></head><body>\n"
        "<h1>Medical images on this disc</h1>\n"
        "<p>The images are in the DICOM format, indexed by the DICOMDIR file, as the IHE "
        "Portable Data for Imaging profile describes. Open them with a DICOM viewer or "
        "import the disc into a PACS. Nothing on this disc runs by itself.</p>\n"
        '<table border="1"><tr><th>Patient</th><th>Date</th><th>Study</th>'
        "<th>Modality</th><th>Series</th><th>Images</th></tr>\n"
        + "\n".join(rows)
        + "\n</table>\n"
        + (f"<h2>Documents</h2><ul>{docs}</ul>\n" if docs else "")
        + "<p>See README.TXT for the same list in plain text.</p>\n</body></html>\n"
    )


def _volume_id(volume_id: str) -> str:
    cleaned = re.sub(r"[^A-Z0-9_]", "_", volume_id.upper())[:16]
    return cleaned or "EMIX"


# --------------------------------------------------------------------------- writers


class _LazyStream:
    """A read-only stream of known length, opened on first use and closed at its end.

    pycdlib wants every file object when the image is planned; opening them all at once
    would exhaust file descriptors (or memory, for a download from the hub).
    """

    mode = "rb"  # pycdlib accepts only binary file objects

    def __init__(self, opener: Callable[[], BinaryIO], length: int) -> None:
        self._opener = opener
        self._length = length
        self._stream: BinaryIO | None = None
        self._position = 0

    def _open(self) -> BinaryIO:
        if self._stream is None:
            self._stream = self._opener()
            if self._position:
                self._stream.seek(self._position)
        return self._stream

    def seek(self, offset: int, whence: int = 0) -> int:
        target = {0: offset, 1: self._position + offset, 2: self._length + offset}[whence]
        if target != self._position or self._stream is not None:
            if self._stream is not None:
                if self._stream.seekable():
                    self._stream.seek(target)
                elif target != self._position:
                    self.close()
            self._position = target
        return self._position

    def tell(self) -> int:
        return self._position

    def read(self, size: int = -1) -> bytes:
        left = self._length - self._position
        size = left if size < 0 else min(size, left)
        if size <= 0:
            self.close()
            return b""
        data = self._open().read(size)
        if len(data) < size:
            self.close()
            raise IntegrityError("an item is shorter than its manifest says")
        self._position += len(data)
        if self._position >= self._length:
            self.close()
        return data

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None


def _iso_path(parts: tuple[str, ...]) -> str:
    *folders, name = parts
    if "." not in name:
        name += "."
    return "/" + "/".join([*folders, name]) + ";1"


def write_pdi_iso(entries: Iterable[Entry], out: BinaryIO, *, volume_id: str = "EMIX") -> None:
    """Write the items as an IHE PDI disc image (ISO 9660 Level 1) to ``out``.

    :param entries: each item of a package (DICOM or document) with a callable that opens
        a readable binary stream of its bytes; called twice for DICOM (header, then data).
    :param out: a writable, **seekable** binary file (pycdlib seeks while writing).
    :param volume_id: the disc's label (``A-Z 0-9 _``, at most 16 characters kept).
    :raises InvalidInput: an item marked as DICOM is not DICOM.
    :raises IntegrityError: an item is shorter than its manifest says.
    """
    import pycdlib

    layout = _plan(entries)
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=1, vol_ident=_volume_id(volume_id), app_ident_str="EMIX")
    made: set[tuple[str, ...]] = set()
    lazies: list[_LazyStream] = []

    def add(parts: tuple[str, ...], stream: Any, length: int) -> None:
        for depth in range(1, len(parts)):
            folder = parts[:depth]
            if folder not in made:
                iso.add_directory("/" + "/".join(folder))
                made.add(folder)
        iso.add_fp(stream, length, _iso_path(parts))

    texts = {
        ("DICOMDIR",): _dicomdir_bytes(layout, _volume_id(volume_id)),
        ("INDEX.HTM",): _index_html(layout).encode("utf-8"),
        ("README.TXT",): _readme(layout).encode("utf-8"),
    }
    for parts, data in texts.items():
        add(parts, io.BytesIO(data), len(data))
    things: list[_Instance | _Document] = [*layout.instances(), *layout.documents]
    for thing in things:
        lazy = _LazyStream(thing.opener, thing.item.size)
        lazies.append(lazy)
        add(thing.file_id, lazy, thing.item.size)
    try:
        iso.write_fp(out)
    finally:
        for lazy in lazies:
            lazy.close()
        iso.close()


def write_pdi_folder(entries: Iterable[Entry], folder: Path) -> Path:
    """Write the items as IHE PDI media into ``folder`` (created; must be empty if it exists).

    :returns: the folder, ready to be burnt or copied to a USB stick.
    :raises InvalidInput: the folder is not empty, or an item marked as DICOM is not DICOM.
    """
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise InvalidInput("the folder for the disc content is not empty")
    layout = _plan(entries)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "DICOMDIR").write_bytes(_dicomdir_bytes(layout, "EMIX"))
    (folder / "INDEX.HTM").write_text(_index_html(layout), "utf-8")
    (folder / "README.TXT").write_text(_readme(layout), "utf-8", newline="")
    things: list[_Instance | _Document] = [*layout.instances(), *layout.documents]
    for thing in things:
        target = folder.joinpath(*thing.file_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        with thing.opener() as source, open(target, "wb") as sink:
            copied = 0
            while chunk := source.read(COPY_CHUNK):
                sink.write(chunk)
                copied += len(chunk)
        if copied != thing.item.size:
            raise IntegrityError("an item's size differs from what its manifest says")
    return folder
