"""State that several hub instances share: claimed notifications, and (outside SQLite,
where the chain keeps its own file) the audit chain and its checkpoints.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

from emix_core.errors import ConfigError

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _audit_in_database() -> bool:
    return op.get_bind().dialect.name != "sqlite"


def upgrade() -> None:
    op.create_table(
        "notices",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("package_id", sa.String(32), sa.ForeignKey("packages.id"), nullable=False),
        sa.Column("email", sa.String(254), nullable=False),
        sa.Column("instance", sa.String(32), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("package_id", "email"),
    )
    op.create_index("ix_notices_package_id", "notices", ["package_id"])
    if not _audit_in_database() or sa.inspect(op.get_bind()).has_table("audit_events"):
        return  # SQLite: the chain has its own file; else made by an earlier AuditLog
    op.create_table(
        "audit_events",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("time", sa.String(32), nullable=False),
        sa.Column("event_type", sa.String(40), nullable=False),
        sa.Column("action", sa.String(1), nullable=False),
        sa.Column("outcome", sa.Integer, nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("package_id", sa.String(64), nullable=True),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("phi", sa.LargeBinary, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_index("ix_audit_events_time", "audit_events", ["time"])
    op.create_index("ix_audit_events_package_id", "audit_events", ["package_id"])
    op.create_table(
        "audit_checkpoints",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("log", sa.String(64), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("signed", sa.Text, nullable=False),
        sa.Column("signature", sa.String(128), nullable=False, unique=True),
    )
    op.create_table(
        "audit_meta",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )


def downgrade() -> None:
    if _audit_in_database():
        rows = op.get_bind().execute(sa.text("SELECT count(*) FROM audit_events")).scalar()
        if rows:
            raise ConfigError(
                f"refusing to downgrade: the audit chain holds {rows} rows, kept six years; "
                "export them (emix audit export) and move them elsewhere first"
            )
        for table in ("audit_meta", "audit_checkpoints", "audit_events"):
            op.drop_table(table)
    op.drop_table("notices")
