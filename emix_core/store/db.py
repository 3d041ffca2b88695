"""Metadata database (SQLAlchemy). SQLite in WAL mode by default; PostgreSQL at scale.

PHI never sits here in plaintext: the per-package summary (patients, studies) is sealed
with the package's data key, so destroying that key at retention shreds it too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from emix_core.model import utcnow


class Base(DeclarativeBase):
    pass


class Facility(Base):
    """A member institution."""

    __tablename__ = "facilities"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    address: Mapped[str] = mapped_column(String(63), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    admin_email: Mapped[str] = mapped_column(String(254))
    report_format: Mapped[str] = mapped_column(String(16), default="pdf")
    signing_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    max_retention_days: Mapped[int] = mapped_column(Integer, default=30)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Member(Base):
    """A person at a facility, verified by the facility's admin."""

    __tablename__ = "members"
    __table_args__ = (UniqueConstraint("facility_id", "email"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    facility_id: Mapped[int] = mapped_column(ForeignKey("facilities.id"))
    email: Mapped[str] = mapped_column(String(254))
    role: Mapped[str] = mapped_column(String(16), default="member")
    verified: Mapped[bool] = mapped_column(Boolean, default=False)
    confirmed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    confirm_code_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Token(Base):
    """An API token, stored as its SHA-256 only."""

    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    member_id: Mapped[int] = mapped_column(ForeignKey("members.id"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str] = mapped_column(String(100), default="")
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class PackageRow(Base):
    """A package's metadata; its bytes live in the blob store, encrypted."""

    __tablename__ = "packages"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    sender_facility_id: Mapped[int] = mapped_column(ForeignKey("facilities.id"))
    sender_member_id: Mapped[int] = mapped_column(ForeignKey("members.id"))
    state: Mapped[str] = mapped_column(String(16), default="open")
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    sealed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    expires: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    legal_hold: Mapped[bool] = mapped_column(Boolean, default=False)
    wrapped_key: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    summary: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    item_count: Mapped[int] = mapped_column(Integer, default=0)
    total_size: Mapped[int] = mapped_column(BigInteger, default=0)
    purged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class PackageRecipient(Base):
    """One addressee of a package: a facility, or one member of it."""

    __tablename__ = "package_recipients"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    package_id: Mapped[str] = mapped_column(ForeignKey("packages.id"), index=True)
    facility_id: Mapped[int] = mapped_column(ForeignKey("facilities.id"), index=True)
    member_id: Mapped[int | None] = mapped_column(ForeignKey("members.id"), nullable=True)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    receipt: Mapped[str | None] = mapped_column(String, nullable=True)


class ItemRow(Base):
    """One stored item (ciphertext in the blob store)."""

    __tablename__ = "items"
    package_id: Mapped[str] = mapped_column(ForeignKey("packages.id"), primary_key=True)
    item_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    media_type: Mapped[str] = mapped_column(String(100))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class NoticeRow(Base):
    """A notification claimed for sending: one row per package and address, so that two
    hub instances racing on the same package never mail the same person twice."""

    __tablename__ = "notices"
    __table_args__ = (UniqueConstraint("package_id", "email"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    package_id: Mapped[str] = mapped_column(ForeignKey("packages.id"), index=True)
    email: Mapped[str] = mapped_column(String(254))
    instance: Mapped[str] = mapped_column(String(32))
    claimed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class OutgoingMail(Base):
    """A mail waiting in the hub's durable outbox, sent by a background worker.

    ``body`` holds the address and text sealed under the hub's key wrapper (see
    :mod:`emix_core.hub.outbox`), cleared once the mail is sent; ``recipient`` is masked;
    ``last_error`` holds the kind of failure only, never an address or a server reply.
    """

    __tablename__ = "mail_outbox"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    recipient: Mapped[str] = mapped_column(String(254))
    subject: Mapped[str] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    next_attempt: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    claimed_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_error: Mapped[str | None] = mapped_column(String(200), nullable=True)


class Attempt(Base):
    """A failed (or rate-counted) attempt under a throttle key: the one table of every
    throttle, shared by all hub processes.

    Keys say what is counted: ``client:<address>`` and ``credential:<hash>`` (API tokens,
    confirmation codes), ``member:<email>``, ``signin:<address>``, ``code-mail:<email>``
    (the browser). A credential is only ever a hash of what was presented.
    """

    __tablename__ = "attempts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(100), index=True)
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)


class WebLink(Base):
    """A one-time sign-in link mailed to a member (only its SHA-256 is kept)."""

    __tablename__ = "web_links"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    member_id: Mapped[int] = mapped_column(ForeignKey("members.id"), index=True)
    package_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    code_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    code_expires: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class WebIdentity(Base):
    """A member who confirmed, in the browser, that they own their mail address."""

    __tablename__ = "web_identities"
    member_id: Mapped[int] = mapped_column(ForeignKey("members.id"), primary_key=True)
    confirmed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WebSession(Base):
    """A browser session (the cookie holds a random token; only its SHA-256 is kept)."""

    __tablename__ = "web_sessions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    member_id: Mapped[int | None] = mapped_column(ForeignKey("members.id"), index=True)
    patient_share_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    csrf: Mapped[str] = mapped_column(String(64))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: When an administrator passed the second factor in this session (``None``: not yet).
    second_factor_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )


class AdminFactor(Base):
    """An administrator's authenticator (TOTP) secret, sealed with a data key that the hub's
    key-encryption key wraps; ``enrolled_at`` is ``None`` until they typed a valid code."""

    __tablename__ = "admin_factors"
    member_id: Mapped[int] = mapped_column(ForeignKey("members.id"), primary_key=True)
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)
    secret: Mapped[bytes] = mapped_column(LargeBinary)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    enrolled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: The last 30-second time step whose code was accepted: a code is good once.
    last_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class RecoveryCode(Base):
    """A one-time recovery code of an administrator, kept as an Argon2id hash only."""

    __tablename__ = "recovery_codes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    member_id: Mapped[int] = mapped_column(ForeignKey("members.id"), index=True)
    code_hash: Mapped[str] = mapped_column(String(200))
    used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class PatientShare(Base):
    """One study shared with a patient: their mail address plus an access code given in person."""

    __tablename__ = "patient_shares"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    package_id: Mapped[str] = mapped_column(ForeignKey("packages.id"), index=True)
    study_uid: Mapped[str] = mapped_column(String(64))
    email: Mapped[str] = mapped_column(String(254))
    code_hash: Mapped[str] = mapped_column(String(64))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_by: Mapped[int] = mapped_column(ForeignKey("members.id"))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Destination(Base):
    """Where "push to my PACS" sends a facility's packages (a DICOMweb STOW-RS root)."""

    __tablename__ = "destinations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    facility_id: Mapped[int] = mapped_column(ForeignKey("facilities.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    url: Mapped[str] = mapped_column(String(500))


class PluginRecord(Base):
    """A short-lived record a plugin keeps on the hub (e.g. an OAuth transaction), shared by
    every hub process; the key is stored as SHA-256 only."""

    __tablename__ = "plugin_records"
    __table_args__ = (UniqueConstraint("namespace", "key_hash"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    namespace: Mapped[str] = mapped_column(String(64))
    key_hash: Mapped[str] = mapped_column(String(64))
    #: Records a plugin takes together (e.g. one facility's queued requests); may be None.
    group_name: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    value: Mapped[bytes] = mapped_column(LargeBinary)
    expires: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA secure_delete=ON")
    cursor.close()


def engine_url(url: str) -> str:
    """The SQLAlchemy URL for a database URL: ``postgresql://`` means psycopg 3."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain) :]
    return url


def redact_url(url: str) -> str:
    """A database URL without its password, for messages and logs."""
    return make_url(engine_url(url)).render_as_string(hide_password=True)


def open_engine(url: str, pool_size: int = 5) -> Engine:
    """An engine for ``url``: SQLite with its pragmas, or a pooled PostgreSQL engine.

    :param pool_size: connections kept per process (PostgreSQL); a few more may open
        under bursts and close again.
    """
    url = engine_url(url)
    if make_url(url).get_backend_name() == "sqlite":
        engine = create_engine(url, future=True)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(
        url,
        future=True,
        pool_size=max(pool_size, 1),
        max_overflow=2,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={"connect_timeout": 10},
    )


class Database:
    """The metadata database of one hub home."""

    def __init__(self, url: str, pool_size: int = 5) -> None:
        self.url = engine_url(url)
        self.engine: Engine = open_engine(url, pool_size)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    def create_all(self) -> None:
        """Create or upgrade the schema to the newest migration (see :mod:`.migrate`)."""
        from emix_core.store.migrate import upgrade

        upgrade(self.engine)

    @contextmanager
    def leader(self, name: str, lock_dir: Path | None = None) -> Iterator[bool]:
        """Try to become the one instance doing ``name`` (a timer's job) right now.

        Yields ``True`` to the leader and ``False`` to everyone else, without waiting.
        PostgreSQL: a session advisory lock held on one connection for the duration, so
        it is released even when the leader dies (its connection closes). SQLite (one
        machine): an exclusive ``flock`` on a file beside the database.
        """
        if not self.is_sqlite:
            key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
            with self.engine.connect() as conn:
                got = conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": key})
                conn.commit()
                try:
                    yield bool(got)
                finally:
                    # a dropped connection released the lock already
                    with contextlib.suppress(DBAPIError):
                        if got:
                            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                            conn.commit()
            return
        folder = lock_dir or Path(make_url(self.url).database or ".").parent
        with open(folder / f".{name}.lock", "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def ping(self) -> None:
        """One round trip to the database (readiness checks)."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: commits on success, rolls back on error."""
        with self._sessions() as session, session.begin():
            yield session

    def checkpoint(self) -> None:
        """Flush the SQLite WAL so that overwritten (shredded) pages leave the log too."""
        if self.engine.dialect.name == "sqlite":
            with self.engine.connect() as conn:
                conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
