"""The hub's "Send to my PACS" into a DICOM node: C-STORE of a package's instances.

Answers ``emix_pacs_push`` for targets written ``AET@HOST:PORT``. Instances are written,
a batch at a time, to a private temporary folder (the hub stores them encrypted; a
C-STORE needs the plain bytes), stored through the same path as ``emix dimse deliver``
(each file in its own transfer syntax, decompressed only when the PACS refuses it), and
removed: memory stays flat and at most one batch is on disk at once.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from emix_core import EmixError
from emix_dimse.peers import parse_peer
from emix_dimse.scu import CallSettings, describe, store_instances

__all__ = ["BATCH", "CALLING_AE", "push_package"]

#: Instances written out and stored per association.
BATCH = 200
#: The AE title the hub calls the PACS with (the PACS may have to know it).
CALLING_AE = "EMIX"


def push_package(content: Any, target: str) -> dict[str, Any] | None:
    """C-STORE every DICOM instance of an opened package into the node ``target``.

    :returns: ``{"stored", "failed", "errors"}``; ``None`` when ``target`` is not a
        DICOM node (``AET@HOST:PORT``).
    :raises PeerUnavailable: the node cannot be reached or dropped the association.
    """
    try:
        peer = parse_peer(target.strip())
    except EmixError:
        return None
    settings = CallSettings(peer=peer, calling_ae=CALLING_AE)
    items = list(content.dicom_items())
    stored = failed = 0
    errors: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="emix-push-") as folder:
        for start in range(0, len(items), BATCH):
            paths: list[tuple[Path, int | None]] = []
            for item in items[start : start + BATCH]:
                path = Path(folder) / f"{item.id:08d}.dcm"
                with open(path, "wb") as out:
                    for chunk in content.read_item(item.id):
                        out.write(chunk)
                paths.append((path, item.id))
            instances, bad = describe(paths)
            report = store_instances(settings, instances)
            summary = report.summary()
            stored += summary["stored"]
            failed += summary["failed"] + len(bad)
            errors |= {o.reason for o in report.outcomes if o.status == "failed" and o.reason}
            errors |= {"an item is not readable DICOM" for _ in bad}
            for path, _ in paths:
                path.unlink(missing_ok=True)
    return {"stored": stored, "failed": failed, "errors": sorted(errors)}
