"""What a plugin that adds pages to the hub uses: its configuration table, the hub's hooks,
short-lived records shared by every hub process, and signing a verified member in.

A SMART on FHIR launch, a single sign-on bridge or a portal integration uses these instead
of the hub's tables: members, sessions and audit stay in the core.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from datetime import timedelta
from typing import Any

from flask import current_app
from sqlalchemy import delete, select

from emix_core.config import CONFIG_NAME
from emix_core.errors import ConfigError, NotFoundError
from emix_core.model import AuditAction, Principal, utcnow
from emix_core.plugins import Hooks, hooks_for
from emix_core.store.db import Member, PluginRecord, WebIdentity

__all__ = [
    "PluginRecords",
    "hub_config_table",
    "hub_hooks",
    "member_principal",
    "sign_in_member",
    "verified_member",
]

#: Tables of ``emix.toml`` the core reads itself; a plugin's table has another name.
CORE_TABLES = frozenset({"hub", "client", "smtp", "identifiers"})


def _hub() -> Any:
    return current_app.extensions["emix"]


def hub_config_table(name: str) -> dict[str, Any]:
    """The table ``[name]`` of the hub's ``emix.toml`` (``{}`` when absent), for a plugin's
    own settings. Read on each call, so an edited file takes effect without a restart.

    :raises ConfigError: the file is not valid TOML, or ``name`` is one of the core's tables.
    """
    if name in CORE_TABLES:
        raise ConfigError(f"[{name}] belongs to the core; a plugin's settings take another table")
    file = _hub().config.home / CONFIG_NAME
    if not file.exists():
        return {}
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{CONFIG_NAME} is not valid TOML: {exc}") from exc
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{name} in {CONFIG_NAME} must be a table: [{name}]")
    return table


def hub_hooks() -> Hooks:
    """The hooks of the hub serving this request (its own plugin manager)."""
    return hooks_for(_hub().pm)


class PluginRecords:
    """Short-lived JSON records of one plugin, in the hub's database (every process sees
    them). Keys are stored as SHA-256 only, so a key may be a secret (an OAuth ``state``);
    values are stored as given: encrypt what must not sit in the database in clear.

    :param namespace: the plugin's name, e.g. ``smart-launch``.
    """

    def __init__(self, namespace: str) -> None:
        if not namespace or len(namespace) > 64:
            raise ValueError("a namespace has 1 to 64 characters")
        self.namespace = namespace

    @staticmethod
    def _hash(key: str) -> str:
        return hashlib.sha256(key.encode("utf-8")).hexdigest()

    def put(
        self, key: str, value: dict[str, Any], ttl: timedelta, group: str | None = None
    ) -> None:
        """Store (or replace) a record that expires after ``ttl``.

        :param group: a name to take it with others later (:meth:`take_group`), e.g. a
            queue per facility; each record stays a row of its own, so concurrent puts
            never overwrite each other.
        """
        data = json.dumps(value, separators=(",", ":")).encode("utf-8")
        now = utcnow()
        with _hub().db.session() as session:
            session.execute(
                delete(PluginRecord).where(
                    (PluginRecord.namespace == self.namespace)
                    & ((PluginRecord.key_hash == self._hash(key)) | (PluginRecord.expires < now))
                )
            )
            session.add(
                PluginRecord(
                    namespace=self.namespace,
                    key_hash=self._hash(key),
                    group_name=group[:128] if group else None,
                    value=data,
                    expires=now + ttl,
                )
            )

    def _row(self, session: Any, key: str) -> PluginRecord | None:
        row: PluginRecord | None = session.scalar(
            select(PluginRecord).where(
                PluginRecord.namespace == self.namespace,
                PluginRecord.key_hash == self._hash(key),
            )
        )
        return row

    def get(self, key: str) -> dict[str, Any] | None:
        """The unexpired record under ``key``, or ``None``."""
        if not key or len(key) > 512:
            return None
        with _hub().db.session() as session:
            row = self._row(session, key)
            if row is None or _aware(row.expires) < utcnow():
                return None
            value: dict[str, Any] = json.loads(row.value)
            return value

    def take(self, key: str) -> dict[str, Any] | None:
        """Remove and return the record: only one caller ever gets it (single use)."""
        if not key or len(key) > 512:
            return None
        with _hub().db.session() as session:
            row = self._row(session, key)
            if row is None:
                return None
            gone = session.execute(delete(PluginRecord).where(PluginRecord.id == row.id))
            if gone.rowcount != 1 or _aware(row.expires) < utcnow():  # type: ignore[attr-defined]
                return None
            value: dict[str, Any] = json.loads(row.value)
            return value

    def take_group(self, group: str, limit: int = 500) -> list[dict[str, Any]]:
        """Remove and return the unexpired records of a group, oldest first; a record is
        handed to one caller only, even when several take at once."""
        taken: list[dict[str, Any]] = []
        with _hub().db.session() as session:
            rows = session.scalars(
                select(PluginRecord)
                .where(
                    PluginRecord.namespace == self.namespace,
                    PluginRecord.group_name == group[:128],
                )
                .order_by(PluginRecord.id)
                .limit(limit)
            ).all()
            now = utcnow()
            for row in rows:
                gone = session.execute(delete(PluginRecord).where(PluginRecord.id == row.id))
                if gone.rowcount == 1 and _aware(row.expires) >= now:  # type: ignore[attr-defined]
                    taken.append(json.loads(row.value))
        return taken

    def delete(self, key: str) -> None:
        with _hub().db.session() as session:
            session.execute(
                delete(PluginRecord).where(
                    PluginRecord.namespace == self.namespace,
                    PluginRecord.key_hash == self._hash(key),
                )
            )


def _aware(moment: Any) -> Any:
    return moment if moment.tzinfo else moment.replace(tzinfo=utcnow().tzinfo)


def verified_member(email: str) -> Principal | None:
    """The verified member with this address, or ``None`` (none, or several facilities list
    it: an identity from elsewhere must name one member, never guess among them)."""
    from emix_core.hub.sessions import principal_for

    email = email.strip().lower()
    if not email or len(email) > 254:
        return None
    with _hub().db.session() as session:
        ids = list(session.scalars(select(Member.id).where(Member.email == email, Member.verified)))
        if len(ids) != 1:
            return None
        return principal_for(session, ids[0])


def member_principal(member_id: int) -> Principal | None:
    """The member as a principal while they are verified (``None`` once disabled).

    A plugin's page has not asked for the hub's second factor: an administrator counts as
    a member there (``second_factor`` is ``False``), as in a browser session that has
    not passed it; the hub's own pages ask for it.

    .. versionchanged:: 0.2 ``second_factor`` is ``False`` for an administrator.
    """
    from dataclasses import replace

    from emix_core.hub.sessions import principal_for

    with _hub().db.session() as session:
        principal = principal_for(session, member_id)
    if principal is None or not principal.verified:
        return None
    return replace(principal, second_factor=not principal.is_admin)


def sign_in_member(response: Any, member_id: int, *, detail: str) -> Any:
    """Start a browser session for a verified member whose identity a trusted party vouched
    for (e.g. an EMR's verified id_token); the member counts as confirmed from then on.

    :param response: the Flask response that sets the session cookie.
    :param detail: how they signed in, for the audit trail (no PHI).
    """
    from emix_core.hub.auth import audit_request
    from emix_core.hub.web import start_session

    with _hub().db.session() as session:
        member = session.get(Member, member_id)
        if member is None or not member.verified:
            raise NotFoundError("not found")
        if session.get(WebIdentity, member.id) is None:
            session.add(WebIdentity(member_id=member.id))
        if member.confirmed_at is None:
            member.confirmed_at = utcnow()
        email = member.email
    start_session(response, member_id=member_id)
    audit_request("user-authentication", action=AuditAction.EXECUTE, actor=email, detail=detail)
    return response
