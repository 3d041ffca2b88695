"""Manifest parts: the signed manifest of a progressive package, extended batch by batch.

While a sender is still uploading, it signs one *part* per uploaded batch::

    {"format": "emix-manifest-part/1", "package", "sender", "created",
     "part": n, "previous": SHA-256 of part n-1 as signed ("" for part 1),
     "items": [...the batch's items, as in a manifest...]}

Items are listed in increasing id order across parts (each part's ids are higher than
every id of the part before), so that no item is listed twice. Each part is signed with
the sending facility's key and chained to the one before it by hash, so a part cannot be
dropped, reordered or replaced without breaking the chain. The final manifest names the
chain's head (``"parts"``: how many, ``"chain"``: hash of the last one) and lists every
item again, so its signature covers the whole package.

A receiving gateway that opts in stores a part's items into its PACS only after the part's
signature, its place in the chain and every item's SHA-256 verified.
"""

from __future__ import annotations

import hashlib
from typing import Any

from emix_core.content.manifest_rules import check_document
from emix_core.crypto import canonical_json
from emix_core.errors import IntegrityError
from emix_core.model import Item

PART_FORMAT = "emix-manifest-part/1"
#: A package holds at most this many parts (each one small: a batch's item list).
MAX_PARTS = 10_000


def part_hash(signed_part: dict[str, Any]) -> str:
    """The hash that chains a part to the next one: SHA-256 of the signed part (hex)."""
    return hashlib.sha256(canonical_json(signed_part)).hexdigest()


def new_part(
    package_id: str, sender: str, number: int, previous: str, items: list[dict[str, Any]]
) -> dict[str, Any]:
    """An unsigned part document (the sender signs it with ``crypto.sign_document``)."""
    from emix_core.model import utcnow

    return {
        "format": PART_FORMAT,
        "package": package_id,
        "sender": sender,
        "created": utcnow().isoformat(),
        "part": number,
        "previous": previous,
        "items": items,
    }


def check_part(
    document: dict[str, Any], *, package_id: str, sender: str, number: int, previous: str
) -> list[Item]:
    """A verified part's document must be part ``number`` of this package, after ``previous``.

    :raises IntegrityError: another package, sender, place in the chain or format.
    :raises InvalidInput: a malformed item list.
    """
    if document.get("format") != PART_FORMAT or document.get("package") != package_id:
        raise IntegrityError("the manifest part does not belong to this package")
    if document.get("sender") != sender:
        raise IntegrityError("the manifest part names another sender")
    if document.get("part") != number or document.get("previous") != previous:
        raise IntegrityError(
            "the manifest part is out of its chain (missing, repeated or replaced part)"
        )
    return check_document(document)


def check_chain_head(document: dict[str, Any], parts: int, chain: str) -> None:
    """The final manifest must close the chain of the parts that were posted.

    :raises IntegrityError: it names another number of parts or another head.
    """
    if parts == 0 and "parts" not in document and "chain" not in document:
        return
    if document.get("parts") != parts or document.get("chain") != chain:
        raise IntegrityError(
            "the manifest does not close the chain of its parts (a part is missing or replaced)"
        )


def check_items_kept(final: list[Item], received: dict[int, str]) -> None:
    """Items received from parts must appear in the final manifest with the same hash.

    :param received: ``{item id: sha256}`` of what the parts listed.
    """
    by_id = {item.id: item.sha256 for item in final}
    for item_id, sha256 in received.items():
        if by_id.get(item_id) != sha256:
            raise IntegrityError(
                "the final manifest differs from its parts (an item was dropped or replaced)"
            )
