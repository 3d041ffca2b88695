"""The second factor of facility administrators: an authenticator app (TOTP) and one-time
recovery codes.

* **TOTP** (RFC 6238 via pyotp): 30-second steps, 6 digits, one step of clock drift either
  way. The secret is sealed (AES-256-GCM) with a data key of its own that the hub's
  key-encryption key wraps, as package keys are; nothing in the database reads in clear.
  The last accepted time step is kept, so a code works once (a replay is refused, on every
  hub process: the step only ever moves forward, in one conditional ``UPDATE``).
* **Recovery codes**: ten, shown once at enrolment, kept as Argon2id hashes (argon2-cffi);
  each one works once instead of a code from the app.

Wrong codes are throttled per administrator in the hub's one throttle (``2fa:<email>``);
see :mod:`emix_core.hub.web_second_factor` for the pages.
"""

from __future__ import annotations

import hmac
import secrets
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import pyotp
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from emix_core import crypto
from emix_core.model import utcnow
from emix_core.store.db import AdminFactor, RecoveryCode, WebSession

#: Seconds per TOTP step, digits per code, steps of clock drift accepted either way.
PERIOD = 30
DIGITS = 6
DRIFT = 1
#: Recovery codes made at enrolment; characters of each (32 symbols: 5 bits each).
RECOVERY_CODES = 10
RECOVERY_LENGTH = 10
RECOVERY_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
_CONTEXT = b"emix admin totp v1\x00"
#: Argon2id with OWASP's parameters (19 MiB, 2 passes, 1 lane): a recovery code carries 50
#: random bits, so the hash need not be the costliest; checking all ten stays near 0.3 s
#: of one core and the hub process keeps its memory ceiling.
_hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)


def _context(member_id: int) -> bytes:
    return _CONTEXT + str(member_id).encode()


def _seal(hub: Any, member_id: int, secret: str) -> tuple[bytes, bytes]:
    key = crypto.new_data_key()
    wrapped = hub.wrapper.wrap(key, _context(member_id))
    return wrapped, crypto.seal_value(key, secret.encode("ascii"), _context(member_id))


def _open(hub: Any, factor: AdminFactor) -> str:
    key = hub.wrapper.unwrap(factor.wrapped_key, _context(factor.member_id))
    return crypto.open_value(key, factor.secret, _context(factor.member_id)).decode("ascii")


# --------------------------------------------------------------------------- enrolment


def is_enrolled(session: Session, member_id: int) -> bool:
    factor = session.get(AdminFactor, member_id)
    return factor is not None and factor.enrolled_at is not None


# A pending secret is sealed together with the browser session that was shown it
# (``"<session id>:<secret>"``); an enrolled one alone. Only that session sees it and may
# complete the enrolment with it: someone holding the administrator's mailbox who opens the
# step in another browser meanwhile never learns the secret the administrator enrols.


def _pending(hub: Any, factor: AdminFactor) -> tuple[int | None, str]:
    owner, _, secret = _open(hub, factor).rpartition(":")
    return (int(owner) if owner.isdigit() else None), secret


def _live(session: Session, session_id: int | None) -> bool:
    from emix_core.hub.sessions import IDLE, aware

    row = session.get(WebSession, session_id) if session_id is not None else None
    return row is not None and row.ended_at is None and aware(row.last_seen) + IDLE > utcnow()


def _insert_pending(session: Session, values: dict[str, Any]) -> None:
    """Insert a pending enrolment unless one exists already (two first visits at the same
    instant: the second does nothing instead of failing on the primary key)."""
    from sqlalchemy.dialects import postgresql, sqlite

    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    session.execute(dialect.insert(AdminFactor).values(**values).on_conflict_do_nothing())


def pending_secret(
    hub: Any, session: Session, member_id: int, owner: int | None = None
) -> str | None:
    """The secret the browser session ``owner`` is enrolling with (made on its first visit,
    kept until it types a valid code, so a reload shows the same one).

    ``None`` while another live browser session of the administrator has an enrolment
    pending: that one finishes first. A pending enrolment of a session that ended or went
    idle is replaced by a new secret for this one.
    """
    for _ in range(3):  # a concurrent visit may insert or replace the row in between
        factor = session.get(AdminFactor, member_id, populate_existing=True)
        if factor is not None and factor.enrolled_at is not None:
            return None
        if factor is not None:
            holder, secret = _pending(hub, factor)
            if holder == owner:
                return secret
            if _live(session, holder):
                return None
        secret = pyotp.random_base32()  # 160 bits, as RFC 4226 recommends
        wrapped, sealed = _seal(hub, member_id, f"{owner or ''}:{secret}")
        if factor is None:
            _insert_pending(
                session,
                {"member_id": member_id, "wrapped_key": wrapped, "secret": sealed,
                 "created": utcnow()},
            )  # fmt: skip
        else:
            session.execute(
                update(AdminFactor)
                .where(
                    AdminFactor.member_id == member_id,
                    AdminFactor.enrolled_at.is_(None),
                    AdminFactor.secret == factor.secret,
                )
                .values(wrapped_key=wrapped, secret=sealed, created=utcnow(), last_step=None)
                .execution_options(synchronize_session=False)
            )
    return None


def provisioning_uri(hub: Any, secret: str, email: str) -> str:
    """The ``otpauth://`` URI an authenticator app reads (from the QR code)."""
    host = urlsplit(hub.config.hub.public_url).hostname or "hub"
    return _totp(secret).provisioning_uri(name=email, issuer_name=f"emix {host}")


def qr_svg(uri: str) -> str:
    """The URI as a QR code, an inline SVG (no script, no style, nothing fetched)."""
    import segno

    return segno.make(uri, error="m").svg_inline(
        scale=4, title="QR code for your authenticator app", dark="#111", light="#fff"
    )


def complete_enrolment(
    hub: Any,
    session: Session,
    member_id: int,
    code: str,
    now: datetime | None = None,
    *,
    owner: int | None = None,
) -> list[str] | None:
    """Finish the enrolment the browser session ``owner`` started, with a valid code:
    returns the new recovery codes (shown once), or ``None`` when the code is not right
    or the pending secret is not this session's."""
    factor = session.get(AdminFactor, member_id)
    if factor is None or factor.enrolled_at is not None:
        return None
    holder, secret = _pending(hub, factor)
    if holder != owner or not _use_totp(session, member_id, secret, code, now):
        return None
    wrapped, sealed = _seal(hub, member_id, secret)
    done = session.execute(
        update(AdminFactor)
        .where(
            AdminFactor.member_id == member_id,
            AdminFactor.enrolled_at.is_(None),
            AdminFactor.secret == factor.secret,
        )
        .values(enrolled_at=utcnow(), wrapped_key=wrapped, secret=sealed)
        .execution_options(synchronize_session=False)
    )
    if done.rowcount != 1:  # type: ignore[attr-defined]
        return None  # another session completed it at the same moment
    return new_recovery_codes(session, member_id)


# --------------------------------------------------------------------------- codes


def _totp(secret: str) -> pyotp.TOTP:
    return pyotp.TOTP(secret, digits=DIGITS, interval=PERIOD)


def matching_step(secret: str, code: str, now: datetime | None = None) -> int | None:
    """The time step (within the drift) whose code this is, or ``None``."""
    code = "".join(c for c in code if not c.isspace())
    if len(code) != DIGITS or not (code.isascii() and code.isdigit()):
        return None
    totp = _totp(secret)
    step = totp.timecode(now or utcnow())
    found = None
    for candidate in range(step - DRIFT, step + DRIFT + 1):
        if hmac.compare_digest(totp.generate_otp(candidate), code):
            found = candidate  # no early exit: the same work for a right and a wrong code
    return found


def _use_totp(
    session: Session, member_id: int, secret: str, code: str, now: datetime | None
) -> bool:
    step = matching_step(secret, code, now)
    if step is None:
        return False
    # only a step later than the last one used moves it: a replay, even on another hub
    # process at the same moment, changes no row
    moved = session.execute(
        update(AdminFactor)
        .where(
            AdminFactor.member_id == member_id,
            (AdminFactor.last_step.is_(None)) | (AdminFactor.last_step < step),
        )
        .values(last_step=step)
        .execution_options(synchronize_session=False)
    )
    return moved.rowcount == 1  # type: ignore[attr-defined]


def looks_like_recovery_code(code: str) -> bool:
    return len(normalise_recovery_code(code)) == RECOVERY_LENGTH


def normalise_recovery_code(code: str) -> str:
    return "".join(c for c in code.upper() if c not in " -\t")[:64]


def new_recovery_codes(session: Session, member_id: int) -> list[str]:
    """Replace a member's recovery codes by ten new ones; returns them, in clear, once."""
    session.execute(delete(RecoveryCode).where(RecoveryCode.member_id == member_id))
    codes = []
    for _ in range(RECOVERY_CODES):
        raw = "".join(secrets.choice(RECOVERY_ALPHABET) for _ in range(RECOVERY_LENGTH))
        session.add(RecoveryCode(member_id=member_id, code_hash=_hasher.hash(raw)))
        codes.append(f"{raw[:5]}-{raw[5:]}")
    return codes


def remaining_recovery_codes(session: Session, member_id: int) -> int:
    return len(
        list(
            session.scalars(
                select(RecoveryCode.id).where(
                    RecoveryCode.member_id == member_id, RecoveryCode.used_at.is_(None)
                )
            )
        )
    )


def _use_recovery_code(session: Session, member_id: int, code: str) -> bool:
    raw = normalise_recovery_code(code)
    if len(raw) != RECOVERY_LENGTH:
        return False
    unused = session.scalars(
        select(RecoveryCode).where(
            RecoveryCode.member_id == member_id, RecoveryCode.used_at.is_(None)
        )
    ).all()
    for row in unused:
        try:
            _hasher.verify(row.code_hash, raw)
        except (VerificationError, InvalidHashError):
            continue
        taken = session.execute(
            update(RecoveryCode)
            .where(RecoveryCode.id == row.id, RecoveryCode.used_at.is_(None))
            .values(used_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        return taken.rowcount == 1  # type: ignore[attr-defined]
    return False


def verify(
    hub: Any, session: Session, member_id: int, code: str, now: datetime | None = None
) -> str | None:
    """Check a code of an enrolled administrator: ``"totp"`` or ``"recovery code"`` when it
    is right and was not used before, else ``None``."""
    factor = session.get(AdminFactor, member_id)
    if factor is None or factor.enrolled_at is None:
        return None
    if looks_like_recovery_code(code):
        return "recovery code" if _use_recovery_code(session, member_id, code) else None
    secret = _open(hub, factor)
    return "totp" if _use_totp(session, member_id, secret, code, now) else None


# --------------------------------------------------------------------------- sessions, reset


def reset(session: Session, member_id: int) -> bool:
    """Remove an administrator's enrolment and recovery codes and end their browser
    sessions (a lost phone): they enrol again at their next visit. Returns whether they
    were enrolled."""
    enrolled = is_enrolled(session, member_id)
    session.execute(delete(RecoveryCode).where(RecoveryCode.member_id == member_id))
    session.execute(delete(AdminFactor).where(AdminFactor.member_id == member_id))
    session.execute(
        update(WebSession)
        .where(WebSession.member_id == member_id, WebSession.ended_at.is_(None))
        .values(ended_at=utcnow())
    )
    return enrolled


def operator_reset(hub: Any, email: str) -> dict[str, Any]:
    """``emix hub admin-reset-2fa``: the hub's operator removes an administrator's second
    factor (a lost phone). Audited; the administrator enrols again at their next visit.

    :raises NotFoundError: no administrator has this address on this hub.
    """
    from emix_core.errors import NotFoundError
    from emix_core.model import AuditAction
    from emix_core.store.db import Facility, Member

    email = email.strip().lower()
    with hub.db.session() as session:
        rows = session.execute(
            select(Member, Facility.address)
            .join(Facility, Member.facility_id == Facility.id)
            .where(Member.email == email, Member.role == "admin")
        ).all()
        if not rows:
            raise NotFoundError(
                f"no administrator with the address {email!r} on this hub "
                "(emix hub facility list shows the facilities; members have no second factor)"
            )
        facilities = [
            {"facility": address, "was_enrolled": reset(session, m.id)} for m, address in rows
        ]
    hub.audit_operator(
        AuditAction.DELETE, "administrator's second factor reset by the hub operator"
    )
    return {"email": email, "reset": facilities}
