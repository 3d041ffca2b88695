"""A package as one streamed zip: entries stored (DICOM does not deflate), Zip64 always.

Zip64 is used whenever it is needed, so packages over 4 GB or with more than 65,535
entries open in any current unzip tool. The archive's exact size is known up front, so
downloads carry a ``Content-Length`` and show progress.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import zipstream

from emix_core import crypto
from emix_core.content.layout import item_relative_path
from emix_core.model import Item

MANIFEST_NAME = "emix-manifest.json"


def package_zip(
    signed_manifest: dict[str, Any], open_item: Callable[[Item], Iterable[bytes]]
) -> zipstream.ZipStream:
    """Build the zip of a package; item bytes are pulled lazily, one item at a time.

    :param signed_manifest: the package's signed manifest (written as ``emix-manifest.json``).
    :param open_item: returns an item's plaintext chunks when the zip reaches it.
    """
    archive = zipstream.ZipStream(compress_type=zipstream.ZIP_STORED, sized=True)
    manifest_bytes = crypto.canonical_json(signed_manifest)
    archive.add([manifest_bytes], MANIFEST_NAME, size=len(manifest_bytes))
    for entry in signed_manifest["document"]["items"]:
        item = Item.from_dict(entry)
        archive.add(_lazy(open_item, item), item_relative_path(item), size=item.size)
    return archive


def _lazy(open_item: Callable[[Item], Iterable[bytes]], item: Item) -> Iterator[bytes]:
    yield from open_item(item)
