"""Where each item of a package lands on the receiving side (folder, zip, CD).

Paths are built only from validated DICOM UIDs, item numbers and sanitised names;
a raw UID or file name never becomes a path.
"""

from __future__ import annotations

from emix_core.content.documents import safe_name
from emix_core.content.uids import is_valid_uid
from emix_core.model import Item

DICOM_MEDIA_TYPE = "application/dicom"

#: The extension a received document gets, from its checked media type: a sender never
#: picks it (``report.pdf.exe`` sent as a PDF lands as ``report.pdf``).
EXTENSIONS = {
    "application/pdf": ".pdf",
    "application/rtf": ".rtf",
    "text/rtf": ".rtf",
    "application/hl7-v2": ".hl7",
    "application/cda+xml": ".xml",
    "application/xml": ".xml",
    "text/xml": ".xml",
    "application/fhir+json": ".json",
    "application/json": ".json",
    "text/plain": ".txt",
    "image/jpeg": ".jpg",
    "image/png": ".png",
}


def document_name(name: str, media_type: str, fallback: str) -> str:
    """A safe file name whose extension follows the media type, whatever the sender wrote."""
    safe = safe_name(name, fallback=fallback)
    extension = EXTENSIONS.get(media_type, ".bin")
    stem, dot, suffix = safe.rpartition(".")
    if dot and stem and f".{suffix.lower()}" == extension:
        return safe
    base = stem if dot and stem else safe
    return base if base.lower().endswith(extension) else f"{base}{extension}"


def item_relative_path(item: Item) -> str:
    """The relative, POSIX path of an item inside a received package."""
    uids = (item.study_uid, item.series_uid, item.sop_instance_uid)
    if item.media_type == DICOM_MEDIA_TYPE:
        if all(uid and is_valid_uid(uid) for uid in uids):
            return f"DICOM/{uids[0]}/{uids[1]}/{uids[2]}.dcm"
        return f"DICOM/unsorted/item-{item.id:06d}.dcm"
    name = document_name(item.name, item.media_type, fallback=f"item-{item.id}")
    return f"documents/{item.id:04d}-{name}"
