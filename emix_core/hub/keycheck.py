"""Start-up checks of the hub's key-encryption key (KEK), so a lost or damaged KEK is
found by the operator at start, never by recipients as errors on every download."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select

from emix_core.errors import ConfigError, EmixError
from emix_core.store.db import Database, PackageRow

_PROBE_CONTEXT = b"emix-kek-probe"


def stored_package_key(db: Database) -> tuple[str, bytes] | None:
    """The newest package data key the database holds wrapped, if any."""
    with db.session() as session:
        row = session.execute(
            select(PackageRow.id, PackageRow.wrapped_key)
            .where(PackageRow.wrapped_key.is_not(None))
            .order_by(PackageRow.created.desc())
            .limit(1)
        ).first()
    return (row[0], row[1]) if row and row[1] is not None else None


def refuse_new_kek_over_wrapped_keys(home: Path, database_url: str) -> None:
    """``hub init`` must not create a KEK when packages wrapped by a lost one exist."""
    if (home / "keys" / "kek.key").exists():
        return
    if database_url.startswith("sqlite") and not (home / "metadata.db").exists():
        return
    try:
        found = stored_package_key(Database(database_url))
    except Exception:  # no database yet (or not reachable): nothing wrapped to protect
        return
    if found is not None:
        raise ConfigError(
            f"{home / 'keys' / 'kek.key'} is missing but the database holds package keys "
            "wrapped by it; restore the file from your backup of keys/. A new key would "
            "make every stored package unreadable, so `emix hub init` will not create one."
        )


def check_wrapper(wrapper: Any, db: Database) -> None:
    """The KEK loads, wraps and unwraps, and opens the newest stored package key.

    :raises ConfigError: saying what to restore (at start, to the operator).
    """
    from emix_core.hub.packages import package_context

    try:
        probe = b"\0" * 32
        if wrapper.unwrap(wrapper.wrap(probe, _PROBE_CONTEXT), _PROBE_CONTEXT) != probe:
            raise ConfigError("the key wrapper does not give back what it wrapped")
        found = stored_package_key(db)
        if found is not None:
            wrapper.unwrap(found[1], package_context(found[0]))
    except ConfigError:
        raise
    except EmixError as exc:
        raise ConfigError(
            f"the key-encryption key does not open the package keys in the database: {exc.message}"
        ) from None
