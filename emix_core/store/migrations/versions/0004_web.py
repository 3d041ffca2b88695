"""The browser: sign-in links, confirmed identities, sessions, attempt counters, patient
shares and each facility's PACS destination.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "web_links",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("member_id", sa.Integer, sa.ForeignKey("members.id"), nullable=False),
        sa.Column("package_id", sa.String(32), nullable=True),
        sa.Column("created", TZ, nullable=False),
        sa.Column("expires", TZ, nullable=False),
        sa.Column("used_at", TZ, nullable=True),
        sa.Column("code_hash", sa.String(64), nullable=True),
        sa.Column("code_expires", TZ, nullable=True),
    )
    op.create_index("ix_web_links_member_id", "web_links", ["member_id"])
    op.create_table(
        "web_identities",
        sa.Column("member_id", sa.Integer, sa.ForeignKey("members.id"), primary_key=True),
        sa.Column("confirmed_at", TZ, nullable=False),
    )
    op.create_table(
        "web_sessions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("member_id", sa.Integer, sa.ForeignKey("members.id"), nullable=True),
        sa.Column("patient_share_id", sa.Integer, nullable=True),
        sa.Column("csrf", sa.String(64), nullable=False),
        sa.Column("created", TZ, nullable=False),
        sa.Column("last_seen", TZ, nullable=False),
        sa.Column("ended_at", TZ, nullable=True),
    )
    op.create_index("ix_web_sessions_member_id", "web_sessions", ["member_id"])
    op.create_table(
        "web_attempts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("key", sa.String(100), nullable=False),
        sa.Column("time", TZ, nullable=False),
    )
    op.create_index("ix_web_attempts_key", "web_attempts", ["key"])
    op.create_table(
        "patient_shares",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("package_id", sa.String(32), sa.ForeignKey("packages.id"), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("email", sa.String(254), nullable=False),
        sa.Column("code_hash", sa.String(64), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_by", sa.Integer, sa.ForeignKey("members.id"), nullable=False),
        sa.Column("created", TZ, nullable=False),
        sa.Column("expires", TZ, nullable=False),
        sa.Column("revoked_at", TZ, nullable=True),
    )
    op.create_index("ix_patient_shares_package_id", "patient_shares", ["package_id"])
    op.create_table(
        "destinations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("facility_id", sa.Integer, sa.ForeignKey("facilities.id"), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("url", sa.String(500), nullable=False),
    )
    op.create_index("ix_destinations_facility_id", "destinations", ["facility_id"])


def downgrade() -> None:
    for table in (
        "destinations",
        "patient_shares",
        "web_attempts",
        "web_sessions",
        "web_identities",
        "web_links",
    ):
        op.drop_table(table)
