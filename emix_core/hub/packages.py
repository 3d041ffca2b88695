"""Package life cycle on the hub: create, store items encrypted, seal, read, receipt.

Plaintext exists only in memory, one segment at a time. A package is visible to
recipients only once sealed, and sealed only when every item listed in the signed
manifest is durably stored with the declared SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from datetime import timedelta
from typing import Any, BinaryIO

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError as SQLIntegrityError
from sqlalchemy.orm import Session

from emix_core import crypto
from emix_core.content.manifest_rules import check_document
from emix_core.errors import (
    ConflictError,
    IntegrityError,
    InvalidInput,
    NotFoundError,
    PayloadTooLarge,
)
from emix_core.hub.context import Hub
from emix_core.model import Item, Package, Recipient, is_valid_address, utcnow
from emix_core.store.db import (
    Facility,
    ItemRow,
    Member,
    NoticeRow,
    PackageRecipient,
    PackageRow,
)

MANIFEST_FORMAT = "emix-manifest/1"
RECEIPT_FORMAT = "emix-receipt/1"
MANIFEST_BLOB = "manifest"
MAX_ITEMS = 1_000_000


def new_package_id() -> str:
    return secrets.token_hex(16)


def check_package_id(package_id: str) -> str:
    if len(package_id) != 32 or any(c not in "0123456789abcdef" for c in package_id):
        raise NotFoundError("not found")
    return package_id


def package_context(package_id: str) -> bytes:
    return b"emix-package:" + package_id.encode("ascii")


def data_key(hub: Hub, row: PackageRow) -> bytes:
    if row.wrapped_key is None:
        raise NotFoundError("not found")  # purged: the key was destroyed
    return hub.wrapper.unwrap(row.wrapped_key, package_context(row.id))


def resolve_recipients(
    session: Session, to: Iterable[str]
) -> list[tuple[str, Facility, Member | None]]:
    """Turn ``b`` or ``someone@example.org`` into facilities (and members), once each.

    An email resolves only to a member who confirmed it (the mailed code proves the
    address), never to an address a facility admin merely typed in.
    """
    resolved: list[tuple[str, Facility, Member | None]] = []
    seen: set[tuple[int, int | None]] = set()
    for address in to:
        if not isinstance(address, str) or not 0 < len(address) <= 254:
            raise InvalidInput("each recipient must be a facility address or a member email")
        if "@" in address:
            members = session.scalars(
                select(Member).where(
                    Member.email == address.strip().lower(),
                    Member.verified.is_(True),
                    Member.confirmed_at.is_not(None),
                )
            ).all()
            if not members:
                raise InvalidInput(
                    "a recipient email is not a confirmed member of any facility; ask the "
                    "recipient's facility admin to add them, or send to the facility address"
                )
            if len(members) > 1:
                raise InvalidInput(
                    "a recipient email is a confirmed member of several facilities; "
                    "send to the facility address instead"
                )
            member: Member | None = members[0]
            facility = session.get(Facility, members[0].facility_id)
            assert facility is not None
        else:
            member = None
            facility = session.scalar(select(Facility).where(Facility.address == address))
            if not is_valid_address(address) or facility is None:
                raise InvalidInput(
                    "unknown recipient facility address; `emix facilities` lists the addresses "
                    "you can send to"
                )
        key = (facility.id, member.id if member else None)
        if key not in seen:
            seen.add(key)
            resolved.append((address, facility, member))
    if not resolved:
        raise InvalidInput("a package needs at least one recipient (--to)")
    return resolved


def load_package(session: Session, package_id: str) -> tuple[PackageRow, Package]:
    row = session.get(PackageRow, check_package_id(package_id))
    if row is None or row.state == "purged":
        raise NotFoundError("not found")
    sender = session.get(Facility, row.sender_facility_id)
    recipients = []
    for rec in session.scalars(
        select(PackageRecipient).where(PackageRecipient.package_id == row.id)
    ):
        facility = session.get(Facility, rec.facility_id)
        assert facility is not None  # a recipient row references its facility
        member = session.get(Member, rec.member_id) if rec.member_id else None
        recipients.append(
            Recipient(facility=facility.address, email=member.email if member else None)
        )
    package = Package(
        id=row.id,
        sender=sender.address if sender else "",
        recipients=recipients,
        state=row.state,
        created=row.created,
        expires=row.expires,
    )
    return row, package


def lock_package(session: Session, package_id: str) -> None:
    """Lock a package's row until the transaction ends (PostgreSQL ``FOR UPDATE``; SQLite
    has one writer at a time anyway), so a state change is decided once across instances."""
    session.execute(
        select(PackageRow.id).where(PackageRow.id == check_package_id(package_id)).with_for_update()
    )


def claim_notice(hub: Hub, package_id: str, email: str) -> bool:
    """Claim the right to notify ``email`` about a package: ``True`` once, ever.

    The unique (package, email) row is the claim, so two instances (or a retried seal)
    never mail the same person twice about the same package.
    """
    try:
        with hub.db.session() as session:
            session.add(NoticeRow(package_id=package_id, email=email, instance=hub.instance))
    except SQLIntegrityError:
        return False
    return True


def create_package(
    hub: Hub, session: Session, sender: Member, to: list[str], expires_days: int | None
) -> tuple[PackageRow, list[dict[str, Any]]]:
    """Open a package; also return whom each recipient address resolved to."""
    facility = session.get(Facility, sender.facility_id)
    assert facility is not None
    days = min(
        expires_days or hub.config.hub.default_retention_days,
        facility.max_retention_days or hub.config.hub.default_retention_days,
    )
    if days < 1:
        raise InvalidInput("expires_days must be at least 1")
    package_id = new_package_id()
    row = PackageRow(
        id=package_id,
        sender_facility_id=facility.id,
        sender_member_id=sender.id,
        state="open",
        created=utcnow(),
        expires=utcnow() + timedelta(days=days),
        wrapped_key=hub.wrapper.wrap(crypto.new_data_key(), package_context(package_id)),
    )
    session.add(row)
    session.flush()
    resolved = []
    for given, rec_facility, member in resolve_recipients(session, to):
        session.add(
            PackageRecipient(
                package_id=package_id,
                facility_id=rec_facility.id,
                member_id=member.id if member else None,
            )
        )
        resolved.append(
            {
                "to": given,
                "facility": rec_facility.address,
                "email": member.email if member else None,
            }
        )
    return row, resolved


def stored_bytes(session: Session, package_id: str) -> int:
    """Bytes of the items stored so far for a package."""
    total = session.scalar(
        select(func.coalesce(func.sum(ItemRow.size), 0)).where(ItemRow.package_id == package_id)
    )
    return int(total or 0)


def check_item_size(hub: Hub, size: int, package_bytes: int) -> None:
    """413 when an item, or the package with it, would exceed the hub's limits.

    :param package_bytes: bytes the package already holds.
    """
    limits = hub.config.hub
    if size > limits.max_item_bytes:
        raise PayloadTooLarge(
            f"item of {size} bytes exceeds the hub's limit of {limits.max_item_bytes}"
        )
    if package_bytes + size > limits.max_package_bytes:
        raise PayloadTooLarge("package exceeds the hub's size limit; split it")


def write_item(  # type: ignore[no-untyped-def]
    hub: Hub,
    row: PackageRow,
    item_id: int,
    body: BinaryIO,
    *,
    size: int,
    buffer: memoryview | None = None,
):
    """Stream ``size`` bytes of one item into the blob store, encrypted, not yet committed.

    :param buffer: where to receive the bytes (reused for the items of a batch);
        one segment's worth is allocated when not given.

    :return: the plaintext's SHA-256 (hex) and the blob writer; the caller commits it
        only if the digest is the expected one, and aborts it otherwise.
    """
    if not 1 <= item_id <= MAX_ITEMS:
        raise InvalidInput("item id out of range")
    key = crypto.derive_item_key(data_key(hub, row), row.id, item_id)
    encryptor = crypto.StreamEncryptor(key, crypto.item_associated_data(row.id, item_id))
    digest = hashlib.sha256()
    received = 0
    writer = hub.blobs.writer(f"{row.id}/{item_id}")
    if buffer is None:
        buffer = memoryview(bytearray(min(crypto.SEGMENT_SIZE, max(size, 1))))
    try:
        writer.write(encryptor.header)
        while received < size:
            got = fill(body, buffer[: min(len(buffer), size - received)])
            if not got:
                break
            received += got
            digest.update(buffer[:got])
            writer.write(encryptor.update(buffer[:got]))
        writer.write(encryptor.finalize())
        if received != size:
            raise IntegrityError("upload ended early; nothing was stored, send the item again")
    except BaseException:
        writer.abort()
        raise
    return digest.hexdigest(), writer


def fill(body: BinaryIO, view: memoryview) -> int:
    """Read from ``body`` until ``view`` is full or the body ends; return the bytes read.

    A body with ``readinto`` (the hub's worker gives request bodies one) fills ``view``
    straight from the socket; any other is read and copied.
    """
    readinto = getattr(body, "readinto", None)
    filled = 0
    while filled < len(view):
        if readinto is not None:
            got = readinto(view[filled:])
        else:
            data = body.read(len(view) - filled)
            got = len(data)
            view[filled : filled + got] = data
        if not got:
            break
        filled += got
    return filled


def store_item(
    hub: Hub, row: PackageRow, item_id: int, body: BinaryIO, *, size: int, sha256: str
) -> Any:
    """Write one item; return its writer, uncommitted, if its bytes match the SHA-256."""
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise InvalidInput("X-Emix-SHA256 must be the lowercase hex SHA-256 of the item")
    digest, writer = write_item(hub, row, item_id, body, size=size)
    if digest != sha256:
        writer.abort()
        raise IntegrityError("uploaded bytes do not match the declared SHA-256; nothing was stored")
    return writer


def lock_open_package(session: Session, package_id: str) -> None:
    """Take the package's row lock, first thing in a transaction; 409 unless still open.

    Uploads commit and seals check under this lock, one at a time: an upload in flight
    when the package is sealed is refused, and two uploads of one item id leave the
    database and the blob store in step.
    """
    locked = session.execute(  # type: ignore[attr-defined]  # an UPDATE's CursorResult
        update(PackageRow)
        .where(PackageRow.id == package_id, PackageRow.state == "open")
        .values(state="open")
    ).rowcount
    if not locked:
        raise ConflictError(
            "the package was sealed meanwhile; nothing was stored, create a new package"
        )


_syncers: ThreadPoolExecutor | None = None
_syncers_lock = threading.Lock()


def sync_all(writers: list[Any]) -> None:
    """Make blobs durable, several at once: the file system's journal then commits
    their fsyncs together instead of one after the other."""
    global _syncers
    # ``sync`` is optional for a plugin's blob store: its ``commit`` then makes it durable
    syncs = [writer.sync for writer in writers if callable(getattr(writer, "sync", None))]
    if len(syncs) < 2:
        for sync in syncs:
            sync()
        return
    with _syncers_lock:
        if _syncers is None:
            _syncers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="emix-fsync")
    futures = [_syncers.submit(sync) for sync in syncs]
    wait_all(futures)  # every one finished before any writer may be aborted
    for done in futures:
        done.result()


def commit_items(hub: Hub, package_id: str, written: list[tuple[Any, ItemRow]]) -> None:
    """Make uploaded items visible and record them, atomically with the open-state check."""
    if not written:
        return
    committed = 0
    try:
        # durable first, outside the package lock: other batches commit meanwhile
        sync_all([writer for writer, _ in written])
        with hub.db.session() as session:
            lock_open_package(session, package_id)
            for writer, _ in written:
                writer.commit()
                committed += 1
            hub.blobs.sync(package_id)
            record_items(session, package_id, [item for _, item in written])
    except BaseException:
        for writer, _ in written[committed:]:
            writer.abort()
        raise


def record_items(session: Session, package_id: str, rows: list[ItemRow]) -> None:
    """Record stored items (replacing an earlier upload of the same item id)."""
    for item in rows:
        existing = session.get(ItemRow, (package_id, item.item_id))
        if existing is not None:
            session.delete(existing)
    session.flush()
    session.add_all(rows)


def read_item(hub: Hub, row: PackageRow, item_id: int | str) -> Iterator[bytes]:
    """Decrypted bytes of a stored item; raises IntegrityError on any tampering."""
    key = crypto.derive_item_key(data_key(hub, row), row.id, item_id)
    aad = crypto.item_associated_data(row.id, item_id)
    return crypto.decrypt_stream(key, aad, hub.blobs.read(f"{row.id}/{item_id}"))


def put_small_blob(hub: Hub, row: PackageRow, name: str, data: bytes) -> None:
    key = crypto.derive_item_key(data_key(hub, row), row.id, name)
    writer = hub.blobs.writer(f"{row.id}/{name}")
    try:
        for chunk in crypto.encrypt_stream(key, crypto.item_associated_data(row.id, name), [data]):
            writer.write(chunk)
    except BaseException:
        writer.abort()
        raise
    writer.commit()
    hub.blobs.sync(row.id)


def seal_summary(hub: Hub, row: PackageRow, summary: dict[str, Any]) -> bytes:
    return crypto.seal_value(
        crypto.derive_item_key(data_key(hub, row), row.id, "summary"),
        crypto.canonical_json(summary),
        package_context(row.id),
    )


def open_summary(hub: Hub, row: PackageRow) -> dict[str, Any]:
    if row.summary is None:
        return {}
    data = crypto.open_value(
        crypto.derive_item_key(data_key(hub, row), row.id, "summary"),
        row.summary,
        package_context(row.id),
    )
    return json.loads(data)


def check_manifest(
    session: Session, row: PackageRow, package: Package, document: dict[str, Any]
) -> list[Item]:
    """The signed manifest must describe exactly what the hub stored."""
    if document.get("format") != MANIFEST_FORMAT or document.get("package") != row.id:
        raise IntegrityError("manifest does not belong to this package")
    if document.get("sender") != package.sender:
        raise IntegrityError("manifest names another sender")
    items = check_document(document)
    stored = {
        r.item_id: r for r in session.scalars(select(ItemRow).where(ItemRow.package_id == row.id))
    }
    if sorted(i.id for i in items) != sorted(stored):
        raise IntegrityError(
            "manifest and uploaded items differ; upload every listed item before sealing"
        )
    for item in items:
        stored_item = stored[item.id]
        if (stored_item.sha256, stored_item.size) != (item.sha256, item.size):
            raise IntegrityError("an uploaded item does not match its manifest entry")
    return items
