"""The hash-chained audit log of one home (a hub's, or a sending side's).

Every row holds the SHA-256 of the previous row's hash and all of its own fields, so
editing, deleting or reordering a row breaks the chain and :meth:`AuditLog.verify`
names the first bad row. Someone who knows this code could still rewrite the whole
chain consistently, or cut its tail; signed *checkpoints* of the chain head catch that:
the hub signs its head and hands the checkpoint to the sending side, which keeps it in
its own log, and any checkpoint kept elsewhere can be passed to :meth:`AuditLog.verify`.

PHI (``AuditEvent.phi``) is stored only sealed with the audit key (AES-256-GCM, bound
to the log and the row), so nothing of it is in plaintext in the database file.
The audit key is not a package key: retention never destroys it, and audit rows are
kept for :data:`AUDIT_RETENTION_DAYS`.

One log is one SQLite file in WAL mode, or (hub instances sharing PostgreSQL) tables in
the hub's database. Writers may be several processes, or several machines, at once: each
append reads the head and inserts the next row inside one transaction that first takes
the log's write lock (``BEGIN IMMEDIATE`` on SQLite, a transaction-scoped advisory lock
on PostgreSQL), so there is exactly one chain with no gaps and no fork.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Engine,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    select,
)
from sqlalchemy import (
    text as sql,
)
from sqlalchemy.pool import NullPool

from emix_core.audit.export import (
    EVENT_TYPES,
    to_dicom_audit_message,
    to_dicom_audit_messages,
    to_fhir_audit_event,
)
from emix_core.crypto import (
    KEY_SIZE,
    SigningKey,
    canonical_json,
    open_value,
    seal_value,
    sign_document,
    verify_document,
)
from emix_core.errors import ConfigError, IntegrityError, InvalidInput
from emix_core.model import AuditEvent, utcnow

__all__ = [
    "AUDIT_RETENTION_DAYS",
    "EVENT_TYPES",
    "AuditLog",
    "VerifyResult",
    "genesis_hash",
    "row_hash",
    "to_dicom_audit_message",
    "to_dicom_audit_messages",
    "to_fhir_audit_event",
]

#: Audit rows younger than this are never deleted, by retention or anything else
#: (six years, the longest common record-keeping rule for health data, e.g. HIPAA).
AUDIT_RETENTION_DAYS = 6 * 366

ACTIONS = frozenset("CRUDE")
OUTCOMES = frozenset({0, 4, 8, 12})
#: The fields of a row that its hash covers, besides ``prev_hash``.
ROW_FIELDS = (
    "seq",
    "time",
    "event_type",
    "action",
    "outcome",
    "actor",
    "source",
    "package_id",
    "detail",
    "phi",
)
_ROW_CONTEXT = b"emix audit row v1\x00"
_GENESIS_CONTEXT = b"emix audit genesis v1\x00"
_PHI_CONTEXT = b"emix audit phi v1\x00"
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
_BUSY_TIMEOUT_S = 60
#: ``pg_advisory_xact_lock`` key serializing appends on PostgreSQL (bytes of "emixaudt").
AUDIT_LOCK = 0x656D6978_61756474

_metadata = MetaData()
audit_events = Table(
    "audit_events",
    _metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("time", String(32), nullable=False, index=True),
    Column("event_type", String(40), nullable=False),
    Column("action", String(1), nullable=False),
    Column("outcome", Integer, nullable=False),
    Column("actor", Text, nullable=False),
    Column("source", Text, nullable=False),
    Column("package_id", String(64), nullable=True, index=True),
    Column("detail", Text, nullable=False),
    Column("phi", LargeBinary, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)
audit_checkpoints = Table(
    "audit_checkpoints",
    _metadata,
    Column("id", Integer, primary_key=True),
    Column("log", String(64), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("signed", Text, nullable=False),
    Column("signature", String(128), nullable=False, unique=True),
)
audit_meta = Table(
    "audit_meta",
    _metadata,
    Column("name", String(32), primary_key=True),
    Column("value", Text, nullable=False),
)


def _iso(moment: datetime) -> str:
    """Fixed-width ISO 8601 UTC, so that text order is time order."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime(_TIME_FORMAT)


def genesis_hash(log_id: str) -> str:
    """The ``prev_hash`` of row 1: binds the chain to its log id."""
    return hashlib.sha256(_GENESIS_CONTEXT + log_id.encode("utf-8")).hexdigest()


def row_hash(row: dict[str, Any]) -> str:
    """SHA-256 (hex) of a row: its ``prev_hash`` and every field of :data:`ROW_FIELDS`.

    ``phi`` enters as its ciphertext (base64), so the chain verifies without the audit key.
    """
    content = {name: row[name] for name in ROW_FIELDS}
    content["phi"] = base64.b64encode(bytes(row["phi"])).decode("ascii")
    content["prev_hash"] = row["prev_hash"]
    return hashlib.sha256(_ROW_CONTEXT + canonical_json(content)).hexdigest()


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :meth:`AuditLog.verify`.

    :param ok: the chain and every applicable checkpoint verified.
    :param rows: rows read.
    :param first_bad_seq: the first row found bad (or missing), ``None`` when ok.
    :param reason: what is wrong, for an administrator; ``"ok"`` when ok.
    """

    ok: bool
    rows: int
    first_bad_seq: int | None = None
    reason: str = "ok"


@dataclass(frozen=True)
class _Expectation:
    head: str
    time: str
    origin: str


class AuditLog:
    """An append-only, hash-chained audit log in one SQLite file or a shared database.

    :param path: the SQLite file (created with its tables if missing), or a database
        URL (``postgresql://...``) or engine whose ``audit_*`` tables hold the log.
    :param audit_key: 32-byte key sealing the PHI of every row.
    :param signing_key: signs checkpoints of this log; verifies them by default.
    :param pool_size: connections kept per process (database URL only).
    """

    def __init__(
        self,
        path: Path | str | Engine,
        audit_key: bytes,
        signing_key: SigningKey | None = None,
        *,
        pool_size: int = 5,
    ) -> None:
        if not isinstance(audit_key, bytes | bytearray) or len(audit_key) != KEY_SIZE:
            raise ConfigError(f"the audit key must be {KEY_SIZE} bytes; check keys/audit.key")
        self.audit_key = bytes(audit_key)
        self.signing_key = signing_key
        self.path: Path | None = None
        if isinstance(path, Engine):
            self._engine = self._writer = path
        elif isinstance(path, str) and "://" in path:
            from emix_core.store.db import open_engine

            self._engine = self._writer = open_engine(path, pool_size)
        else:
            self.path = Path(path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._engine = _open_engine(self.path)
            self._writer = self._engine.execution_options(emix_begin="IMMEDIATE")
        self.log_id = self._create()

    def _lock(self, conn: Any) -> None:
        """Take the log's write lock for this transaction (SQLite: BEGIN IMMEDIATE did)."""
        if conn.dialect.name == "postgresql":
            conn.execute(sql("SELECT pg_advisory_xact_lock(:k)"), {"k": AUDIT_LOCK})

    def _create(self) -> str:
        with self._writer.begin() as conn:
            self._lock(conn)
            _metadata.create_all(conn)
            log_id = conn.scalar(select(audit_meta.c.value).where(audit_meta.c.name == "log_id"))
            if log_id is None:
                log_id = str(uuid.uuid4())
                conn.execute(audit_meta.insert().values(name="log_id", value=log_id))
        return log_id

    def close(self) -> None:
        """Release the database (connections are opened per operation anyway)."""
        self._engine.dispose()

    # ----------------------------------------------------------------------- writing

    def append(self, event: AuditEvent) -> int:
        """Append one event as the next row of the chain.

        :return: the row's ``seq``.
        :raises InvalidInput: unknown event type, action or outcome.
        """
        if event.event_type not in EVENT_TYPES:
            raise InvalidInput(
                f"unknown audit event type {event.event_type!r}; use one of "
                f"{', '.join(sorted(EVENT_TYPES))}"
            )
        if event.action not in ACTIONS or len(event.action) != 1:
            raise InvalidInput(f"audit action must be one of C, R, U, D, E, not {event.action!r}")
        if event.outcome not in OUTCOMES:
            raise InvalidInput(f"audit outcome must be 0, 4, 8 or 12, not {event.outcome!r}")
        phi_json = json.dumps(event.phi or {}, sort_keys=True, ensure_ascii=False, default=str)
        with self._writer.begin() as conn:
            self._lock(conn)
            prev_seq, prev_hash = self._head(conn)
            seq = prev_seq + 1
            row: dict[str, Any] = {
                "seq": seq,
                "time": _iso(event.time),
                "event_type": event.event_type,
                "action": event.action,
                "outcome": int(event.outcome),
                "actor": event.actor or "",
                "source": event.source or "",
                "package_id": event.package_id,
                "detail": event.detail or "",
                "phi": seal_value(self.audit_key, phi_json.encode("utf-8"), self._phi_ad(seq)),
                "prev_hash": prev_hash,
            }
            row["hash"] = row_hash(row)
            conn.execute(audit_events.insert().values(**row))
        return seq

    def _phi_ad(self, seq: int) -> bytes:
        return _PHI_CONTEXT + self.log_id.encode("utf-8") + b"\x00" + str(seq).encode("ascii")

    def _head(self, conn: Any) -> tuple[int, str]:
        last = conn.execute(
            select(audit_events.c.seq, audit_events.c.hash)
            .order_by(audit_events.c.seq.desc())
            .limit(1)
        ).first()
        return (last.seq, last.hash) if last else (0, genesis_hash(self.log_id))

    def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the last row; ``(0, genesis hash)`` for an empty log."""
        with self._engine.connect() as conn:
            return self._head(conn)

    # ----------------------------------------------------------------------- checkpoints

    def checkpoint(self) -> dict[str, Any]:
        """Sign the current head, keep the checkpoint in this log, and return it.

        :return: ``{"document": {"log", "seq", "head", "time"}, "signature",
            "key_fingerprint"}`` (see :func:`emix_core.crypto.sign_document`).
        :raises ConfigError: this log has no signing key.
        """
        if self.signing_key is None:
            raise ConfigError("this audit log has no signing key, so it cannot sign checkpoints")
        with self._writer.begin() as conn:
            self._lock(conn)
            seq, head = self._head(conn)
            document = {"log": self.log_id, "seq": seq, "head": head, "time": _iso(utcnow())}
            signed = sign_document(self.signing_key, document)
            self._keep(conn, signed)
        return signed

    def signed_head(self) -> dict[str, Any]:
        """Sign the current head without keeping it (handed to every API caller).

        :raises ConfigError: this log has no signing key.
        """
        if self.signing_key is None:
            raise ConfigError("this audit log has no signing key, so it cannot sign checkpoints")
        seq, head = self.head()
        document = {"log": self.log_id, "seq": seq, "head": head, "time": _iso(utcnow())}
        return sign_document(self.signing_key, document)

    def store_checkpoint(self, signed: dict[str, Any], public_key_b64: str) -> None:
        """Keep a checkpoint signed by another party (the hub's, on a sending side).

        :raises IntegrityError: the signature does not verify with ``public_key_b64``,
            or the checkpoint is malformed.
        """
        document = verify_document(signed, public_key_b64)
        _check_checkpoint_document(document)
        with self._writer.begin() as conn:
            self._keep(conn, signed)

    def _keep(self, conn: Any, signed: dict[str, Any]) -> None:
        exists = conn.scalar(
            select(audit_checkpoints.c.id).where(
                audit_checkpoints.c.signature == signed["signature"]
            )
        )
        if exists is None:
            conn.execute(
                audit_checkpoints.insert().values(
                    log=str(signed["document"]["log"]),
                    seq=int(signed["document"]["seq"]),
                    signed=json.dumps(signed, sort_keys=True),
                    signature=signed["signature"],
                )
            )

    def checkpoints(self) -> list[dict[str, Any]]:
        """Every checkpoint kept in this log (its own and other parties'), oldest first."""
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(audit_checkpoints.c.signed).order_by(audit_checkpoints.c.id)
            ).scalars()
            out = []
            for text in rows:
                try:
                    out.append(json.loads(text))
                except ValueError:
                    continue  # reported by verify()
            return out

    # ----------------------------------------------------------------------- verifying

    def verify(
        self,
        external_checkpoints: Iterable[dict[str, Any]] = (),
        public_key_b64: str | None = None,
    ) -> VerifyResult:
        """Check the whole chain, then every checkpoint that concerns this log.

        :param external_checkpoints: signed checkpoints kept by another party.
        :param public_key_b64: key the checkpoints of this log are signed with; defaults
            to this log's signing key. Without any key, checkpoints are compared
            without checking their signatures.
        :return: the first problem found, in row order.
        """
        key = public_key_b64 or (self.signing_key.public_key_b64 if self.signing_key else None)
        with self._engine.connect() as conn:
            if conn.dialect.name != "sqlite":  # one consistent snapshot, as SQLite's is
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            return self._verify(conn, external_checkpoints, key)

    def _verify(
        self, conn: Any, external_checkpoints: Iterable[dict[str, Any]], key: str | None
    ) -> VerifyResult:
        with conn.begin():
            expected: dict[int, list[_Expectation]] = {}
            problem = self._collect_checkpoints(conn, external_checkpoints, key, expected)
            if problem is not None:
                return problem
            return self._walk(conn, expected)

    def _collect_checkpoints(
        self,
        conn: Any,
        external: Iterable[dict[str, Any]],
        key: str | None,
        expected: dict[int, list[_Expectation]],
    ) -> VerifyResult | None:
        stored = conn.execute(
            select(audit_checkpoints.c.id, audit_checkpoints.c.signed).order_by(
                audit_checkpoints.c.id
            )
        )
        candidates: list[tuple[str, Any]] = []
        for cp_id, text in stored:
            try:
                candidates.append((f"stored checkpoint {cp_id}", json.loads(text)))
            except ValueError:
                return _bad(0, None, f"stored checkpoint {cp_id} is not JSON (table altered)")
        for n, signed in enumerate(external, start=1):
            candidates.append((f"given checkpoint {n}", signed))
        for origin, signed in candidates:
            document = signed.get("document") if isinstance(signed, dict) else None
            try:
                _check_checkpoint_document(document)
            except IntegrityError:
                return _bad(0, None, f"{origin} is malformed")
            assert isinstance(document, dict)
            signed_here = False
            if key is not None:
                try:
                    verify_document(signed, key)
                    signed_here = True
                except IntegrityError:
                    signed_here = False
            if document["log"] != self.log_id:
                if signed_here:
                    return _bad(
                        0,
                        1,
                        f"{origin}, signed with this log's key on {document['time']}, belongs "
                        "to another log: this log file was replaced or re-created",
                    )
                continue  # another party's log (e.g. the hub's checkpoint kept locally)
            if key is not None and not signed_here:
                return _bad(
                    0,
                    document["seq"] or None,
                    f"{origin} (row {document['seq']}) has a signature that does not verify "
                    "with this log's key: it was forged or altered",
                )
            expected.setdefault(document["seq"], []).append(
                _Expectation(document["head"], document["time"], origin)
            )
        return None

    def _walk(self, conn: Any, expected: dict[int, list[_Expectation]]) -> VerifyResult:
        prev_seq, prev_hash = 0, genesis_hash(self.log_id)
        if bad := _against_checkpoints(0, prev_hash, expected, 0):
            return bad
        rows = 0
        result = conn.execution_options(yield_per=1000).execute(
            select(audit_events).order_by(audit_events.c.seq)
        )
        for record in result.mappings():
            row = dict(record)
            seq = row["seq"]
            rows += 1
            if seq != prev_seq + 1:
                missing = prev_seq + 1
                what = f"rows {missing}-{seq - 1}" if seq - 1 > missing else f"row {missing}"
                return _bad(rows, missing, f"{what} missing (deleted)")
            if row["prev_hash"] != prev_hash:
                return _bad(
                    rows,
                    seq,
                    f"row {seq}: does not follow row {prev_seq} (a row was deleted, reordered "
                    f"or replaced, or row {prev_seq} was rewritten)",
                )
            if row_hash(row) != row["hash"]:
                return _bad(rows, seq, f"row {seq}: hash does not match its content (edited)")
            if bad := _against_checkpoints(seq, row["hash"], expected, rows):
                return bad
            prev_seq, prev_hash = seq, row["hash"]
        beyond = [s for s in expected if s > prev_seq]
        if beyond:
            last = max(beyond)
            when = expected[last][0].time
            return _bad(
                rows,
                prev_seq + 1,
                f"row {prev_seq + 1} missing: the log ends at row {prev_seq} but a checkpoint "
                f"signed {when} covers {last} rows (tail cut)",
            )
        return VerifyResult(ok=True, rows=rows)

    # ----------------------------------------------------------------------- reading

    def events(
        self,
        *,
        package_id: str | None = None,
        since: datetime | str | None = None,
        limit: int | None = 100,
        include_phi: bool = False,
    ) -> list[dict[str, Any]]:
        """Events in log order, for the audit API and exports.

        :param package_id: only events about this package.
        :param since: only events at or after this time (datetime or ISO 8601).
        :param limit: at most this many (``None``: all).
        :param include_phi: decrypt and add ``phi`` (a dict) to every event.
        :raises IntegrityError: with ``include_phi``, a row's PHI does not decrypt.
        """
        query = select(audit_events).order_by(audit_events.c.seq)
        if package_id is not None:
            query = query.where(audit_events.c.package_id == package_id)
        if since is not None:
            query = query.where(audit_events.c.time >= _iso(_parse_time(since)))
        if limit is not None:
            query = query.limit(max(int(limit), 0))
        with self._engine.connect() as conn:
            return [self._public(dict(r), include_phi) for r in conn.execute(query).mappings()]

    def _public(self, row: dict[str, Any], include_phi: bool) -> dict[str, Any]:
        out = {name: row[name] for name in ROW_FIELDS if name != "phi"}
        if include_phi:
            try:
                plain = open_value(self.audit_key, row["phi"], self._phi_ad(row["seq"]))
            except IntegrityError:
                raise IntegrityError(
                    f"audit row {row['seq']}: its PHI does not decrypt (row altered or wrong "
                    "audit key); run `emix audit verify`"
                ) from None
            out["phi"] = json.loads(plain)
        return out


# --------------------------------------------------------------------------- helpers


def _open_engine(path: Path) -> Engine:
    # NullPool: a connection per operation, so a forked worker never shares one.
    engine = create_engine(
        f"sqlite:///{path}",
        poolclass=NullPool,
        connect_args={"timeout": _BUSY_TIMEOUT_S},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves (below)
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_S * 1000}")
        cursor.execute("PRAGMA synchronous=FULL")
        # WAL is persistent in the file; switching needs no open transaction, so here.
        if cursor.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get("emix_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _parse_time(value: datetime | str) -> datetime:
    if isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(f"not an ISO 8601 time: {value!r:.40}") from None


def _check_checkpoint_document(document: Any) -> None:
    if not (
        isinstance(document, dict)
        and isinstance(document.get("log"), str)
        and isinstance(document.get("seq"), int)
        and document["seq"] >= 0
        and isinstance(document.get("head"), str)
        and len(document["head"]) == 64
        and isinstance(document.get("time"), str)
    ):
        raise IntegrityError("audit checkpoint is malformed: it needs log, seq, head and time")


def _against_checkpoints(
    seq: int, actual: str, expected: dict[int, list[_Expectation]], rows: int
) -> VerifyResult | None:
    for cp in expected.get(seq, ()):
        if cp.head != actual:
            return _bad(
                rows,
                seq or 1,
                f"row {seq}: differs from the {cp.origin} signed {cp.time}: the chain was "
                f"rewritten at or before row {seq}",
            )
    return None


def _bad(rows: int, seq: int | None, reason: str) -> VerifyResult:
    return VerifyResult(ok=False, rows=rows, first_bad_seq=seq, reason=reason)
