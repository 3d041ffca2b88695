"""Where each item of a package lands on the receiving side (folder, zip, CD).

Paths are built only from validated DICOM UIDs, item numbers and sanitised names;
a raw UID or file name never becomes a path.
"""

from __future__ import annotations

from emix_core.content.dicom import is_valid_uid
from emix_core.content.documents import safe_name
from emix_core.model import Item

DICOM_MEDIA_TYPE = "application/dicom"


def item_relative_path(item: Item) -> str:
    """The relative, POSIX path of an item inside a received package."""
    uids = (item.study_uid, item.series_uid, item.sop_instance_uid)
    if item.media_type == DICOM_MEDIA_TYPE:
        if all(uid and is_valid_uid(uid) for uid in uids):
            return f"DICOM/{uids[0]}/{uids[1]}/{uids[2]}.dcm"
        return f"DICOM/unsorted/item-{item.id:06d}.dcm"
    return f"documents/{item.id:04d}-{safe_name(item.name, fallback=f'item-{item.id}')}"
