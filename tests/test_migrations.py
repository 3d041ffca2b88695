"""Schema migrations (Alembic): up and down on SQLite and PostgreSQL, and an existing
SQLite hub made before migrations upgrades in place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from emix_core.store import migrate
from emix_core.store.db import Base, Database
from emix_core.testing import emix, emix_json

V01_TABLES = {
    "facilities",
    "members",
    "tokens",
    "packages",
    "package_recipients",
    "items",
    "login_failures",
}


#: the browser's tables (migration 0004)
WEB_TABLES = {
    "web_links",
    "web_identities",
    "web_sessions",
    "web_attempts",
    "patient_shares",
    "destinations",
}
#: plugins' short-lived records (migration 0005)
PLUGIN_TABLES = {"plugin_records"}
#: one throttle (migration 0006): ``attempts`` replaces failed_attempts and web_attempts
THROTTLE_TABLES = (V01_TABLES | {"notices", "attempts"} | WEB_TABLES | PLUGIN_TABLES) - {
    "web_attempts"
}
#: the durable mail outbox (migration 0007)
OUTBOX_TABLES = THROTTLE_TABLES | {"mail_outbox"}
#: administrators' second factor (migration 0008), and web_sessions.second_factor_at
HEAD_TABLES = OUTBOX_TABLES | {"admin_factors", "recovery_codes"}


def session_columns(engine) -> set[str]:  # type: ignore[no-untyped-def]
    return {c["name"] for c in inspect(engine).get_columns("web_sessions")}


def tables(engine) -> set[str]:  # type: ignore[no-untyped-def]
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def make_v01_hub(tmp_path: Path) -> Path:
    """A hub home as emix 0.1 left it: tables from create_all, no migration record."""
    home = tmp_path / "hub"
    emix("hub", "init", "--home", str(home))
    db = home / "metadata.db"
    db.unlink()
    engine = create_engine(f"sqlite:///{db}")
    old = [t for t in Base.metadata.sorted_tables if t.name in V01_TABLES]
    Base.metadata.create_all(engine, tables=old)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO facilities (address, name, admin_email, report_format, "
                "max_retention_days, created) VALUES ('mercy', 'Mercy General', "
                "'admin@mercy.example.org', 'pdf', 30, '2026-01-01 00:00:00')"
            )
        )
    engine.dispose()
    return home


def test_sqlite_hub_from_before_migrations_upgrades_in_place(tmp_path):
    home = make_v01_hub(tmp_path)
    status = emix_json("hub", "migrate", "--home", str(home), "--status")
    assert status["current"] is None and status["head"] == migrate.head()

    done = emix_json("hub", "migrate", "--home", str(home))
    assert done["before"] is None and done["current"] == migrate.head()
    engine = create_engine(f"sqlite:///{home / 'metadata.db'}")
    assert "notices" in tables(engine)
    with engine.connect() as conn:  # the facility made by 0.1 is still there
        assert conn.scalar(text("SELECT name FROM facilities")) == "Mercy General"
    engine.dispose()
    # and the hub works on it: the facility is listed
    listed = emix_json("hub", "facility", "list", "--home", str(home))
    assert "mercy" in json.dumps(listed)


def test_sqlite_migrations_down_and_up(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    db.create_all()
    assert tables(db.engine) == HEAD_TABLES
    assert "second_factor_at" in session_columns(db.engine)
    assert migrate.downgrade(db.engine, "0007") == "0007"
    assert tables(db.engine) == OUTBOX_TABLES
    assert "second_factor_at" not in session_columns(db.engine)
    assert migrate.downgrade(db.engine, "0006") == "0006"
    assert tables(db.engine) == THROTTLE_TABLES
    assert migrate.downgrade(db.engine, "0005") == "0005"
    assert (
        tables(db.engine)
        == V01_TABLES | {"notices", "failed_attempts"} | WEB_TABLES | PLUGIN_TABLES
    )
    assert migrate.downgrade(db.engine, "0004") == "0004"
    assert tables(db.engine) == V01_TABLES | {"notices", "failed_attempts"} | WEB_TABLES
    assert migrate.downgrade(db.engine, "0003") == "0003"
    assert tables(db.engine) == V01_TABLES | {"notices", "failed_attempts"}
    assert migrate.downgrade(db.engine, "0002") == "0002"
    assert tables(db.engine) == V01_TABLES | {"notices"}
    assert migrate.downgrade(db.engine, "0001") == "0001"
    assert tables(db.engine) == V01_TABLES
    assert migrate.downgrade(db.engine, "base") is None
    assert tables(db.engine) == set()
    assert migrate.upgrade(db.engine) == migrate.head()
    assert tables(db.engine) == HEAD_TABLES


def test_migrate_cli_down_up_and_unknown_revision(tmp_path):
    home = tmp_path / "hub"
    emix("hub", "init", "--home", str(home))
    down = emix_json("hub", "migrate", "--home", str(home), "--to", "0001")
    assert (down["before"], down["current"]) == (migrate.head(), "0001")
    up = emix_json("hub", "migrate", "--home", str(home))
    assert up["current"] == migrate.head()
    bad = emix("hub", "migrate", "--home", str(home), "--to", "0000", check=False)
    assert bad.returncode != 0 and "unknown schema revision" in bad.stderr


def test_migrate_outside_a_hub_home_says_what_to_do(tmp_path):
    result = emix("hub", "migrate", "--home", str(tmp_path / "nowhere"), check=False)
    assert result.returncode != 0 and "emix hub init" in result.stderr


@pytest.mark.e2e
def test_postgresql_init_migrate_down_and_up(tmp_path, postgres):
    url = postgres.new_database()
    home = tmp_path / "hub"
    made = emix_json("hub", "init", "--home", str(home), "--database", url)
    assert made["database"].startswith("postgresql+psycopg://")
    assert postgres.password not in json.dumps(made)  # never the password in output
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    everything = HEAD_TABLES | {"audit_events", "audit_checkpoints", "audit_meta"}
    assert tables(engine) == everything
    assert "second_factor_at" in session_columns(engine)

    down = emix_json("hub", "migrate", "--home", str(home), "--to", "0007")
    assert down["current"] == "0007" and "second_factor_at" not in session_columns(engine)
    assert not {"admin_factors", "recovery_codes"} & tables(engine)
    down = emix_json("hub", "migrate", "--home", str(home), "--to", "0001")
    assert down["current"] == "0001" and tables(engine) == V01_TABLES
    down = emix_json("hub", "migrate", "--home", str(home), "--to", "base")
    assert down["current"] is None and tables(engine) == set()
    up = emix_json("hub", "migrate", "--home", str(home))
    assert up["current"] == migrate.head() and tables(engine) == everything
    assert "second_factor_at" in session_columns(engine)
    engine.dispose()


@pytest.mark.e2e
def test_postgresql_downgrade_refuses_to_drop_the_audit_chain(tmp_path, postgres):
    url = postgres.new_database()
    home = tmp_path / "hub"
    emix("hub", "init", "--home", str(home), "--database", url)
    emix(
        "hub",
        "facility",
        "add",
        "Mercy General",
        "--email",
        "a@mercy.example.org",
        "--address",
        "mercy",
        "--home",
        str(home),
    )
    refused = emix("hub", "migrate", "--home", str(home), "--to", "0001", check=False)
    assert refused.returncode != 0 and "audit chain holds" in refused.stderr
    assert postgres.password not in refused.stderr
    assert emix_json("hub", "migrate", "--home", str(home), "--status")["current"] == migrate.head()


@pytest.mark.e2e
def test_database_url_from_the_environment(tmp_path, postgres):
    url = postgres.new_database()
    home = tmp_path / "hub"
    emix("hub", "init", "--home", str(home), env={"EMIX_DATABASE_URL": url})
    assert "database_url" not in (home / "emix.toml").read_text()  # not written down
    status = emix_json(
        "hub", "migrate", "--home", str(home), "--status", env={"EMIX_DATABASE_URL": url}
    )
    assert status["current"] == migrate.head()
    assert status["database"].endswith(url.rsplit("@", 1)[1])
    assert "***" in status["database"]


def test_unreachable_database_is_named_without_its_password(tmp_path):
    from emix_core.testing import free_port

    home = tmp_path / "hub"
    emix("hub", "init", "--home", str(home))
    url = f"postgresql://emix:s3cret-pw@127.0.0.1:{free_port()}/emix"
    result = emix(
        "hub", "migrate", "--home", str(home), env={"EMIX_DATABASE_URL": url}, check=False
    )
    assert result.returncode == 1
    assert "does not answer" in result.stderr and "127.0.0.1" in result.stderr
    assert "s3cret-pw" not in result.stderr and "Traceback" not in result.stderr


def test_sqlite_timers_have_one_leader_per_home(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    other = Database(f"sqlite:///{tmp_path / 'm.db'}")
    with db.leader("retention") as leading:
        assert leading
        with other.leader("retention") as second:
            assert not second
        with other.leader("digest") as independent:
            assert independent
    with other.leader("retention") as leading:
        assert leading


def test_one_throttle_carries_the_counters_of_both_old_tables_over(tmp_path):
    """0006: the API's failed_attempts and the browser's web_attempts become one table,
    and failures counted before the upgrade still count after it."""
    db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    db.create_all()
    migrate.downgrade(db.engine, "0005")  # before 0006
    with db.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO failed_attempts (client, credential, time) "
                "VALUES ('203.0.113.9', 'abc123', CURRENT_TIMESTAMP)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO web_attempts (key, time) "
                "VALUES ('member:dr@lakeside.example.org', CURRENT_TIMESTAMP)"
            )
        )
    migrate.upgrade(db.engine)
    assert "failed_attempts" not in tables(db.engine) and "web_attempts" not in tables(db.engine)
    with db.engine.connect() as conn:
        keys = sorted(conn.scalars(text("SELECT key FROM attempts")))
    assert keys == [
        "client:203.0.113.9",
        "credential:abc123",
        "member:dr@lakeside.example.org",
    ]


def test_sessions_open_before_the_second_factor_existed_have_not_passed_it(tmp_path):
    """0008: a session of an administrator signed in before the upgrade keeps working for
    their inbox but has not passed the second factor (the column starts empty)."""
    db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    db.create_all()
    migrate.downgrade(db.engine, "0007")
    with db.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO facilities (address, name, admin_email, report_format, "
                "max_retention_days, created) VALUES ('mercy', 'Mercy General', "
                "'admin@mercy.example.org', 'pdf', 30, CURRENT_TIMESTAMP)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO members (facility_id, email, role, verified, created) "
                "VALUES (1, 'admin@mercy.example.org', 'admin', 1, CURRENT_TIMESTAMP)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO web_sessions (token_hash, member_id, csrf, created, last_seen) "
                "VALUES ('h', 1, 'c', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            )
        )
    assert migrate.upgrade(db.engine) == migrate.head()
    with db.engine.connect() as conn:
        row = conn.execute(text("SELECT member_id, second_factor_at FROM web_sessions")).one()
    assert tuple(row) == (1, None)
