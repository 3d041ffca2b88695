"""The schema of emix 0.1: facilities, members, tokens, packages, items, sign-in failures.

Revision ID: 0001
Revises:
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "facilities",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("address", sa.String(63), nullable=False, unique=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("admin_email", sa.String(254), nullable=False),
        sa.Column("report_format", sa.String(16), nullable=False),
        sa.Column("signing_key", sa.String(64), nullable=True),
        sa.Column("max_retention_days", sa.Integer, nullable=False),
        sa.Column("created", TZ, nullable=False),
    )
    op.create_table(
        "members",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("facility_id", sa.Integer, sa.ForeignKey("facilities.id"), nullable=False),
        sa.Column("email", sa.String(254), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("verified", sa.Boolean, nullable=False),
        sa.Column("confirmed_at", TZ, nullable=True),
        sa.Column("confirm_code_hash", sa.String(64), nullable=True),
        sa.Column("created", TZ, nullable=False),
        sa.UniqueConstraint("facility_id", "email"),
    )
    op.create_table(
        "tokens",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("member_id", sa.Integer, sa.ForeignKey("members.id"), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("label", sa.String(100), nullable=False),
        sa.Column("created", TZ, nullable=False),
        sa.Column("expires", TZ, nullable=False),
        sa.Column("revoked_at", TZ, nullable=True),
    )
    op.create_table(
        "packages",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("sender_facility_id", sa.Integer, sa.ForeignKey("facilities.id"), nullable=False),
        sa.Column("sender_member_id", sa.Integer, sa.ForeignKey("members.id"), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created", TZ, nullable=False),
        sa.Column("sealed_at", TZ, nullable=True),
        sa.Column("expires", TZ, nullable=False),
        sa.Column("legal_hold", sa.Boolean, nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary, nullable=True),
        sa.Column("summary", sa.LargeBinary, nullable=True),
        sa.Column("item_count", sa.Integer, nullable=False),
        sa.Column("total_size", sa.BigInteger, nullable=False),
        sa.Column("purged_at", TZ, nullable=True),
    )
    op.create_table(
        "package_recipients",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("package_id", sa.String(32), sa.ForeignKey("packages.id"), nullable=False),
        sa.Column("facility_id", sa.Integer, sa.ForeignKey("facilities.id"), nullable=False),
        sa.Column("member_id", sa.Integer, sa.ForeignKey("members.id"), nullable=True),
        sa.Column("delivered_at", TZ, nullable=True),
        sa.Column("receipt", sa.String, nullable=True),
    )
    op.create_index("ix_package_recipients_package_id", "package_recipients", ["package_id"])
    op.create_index("ix_package_recipients_facility_id", "package_recipients", ["facility_id"])
    op.create_table(
        "items",
        sa.Column("package_id", sa.String(32), sa.ForeignKey("packages.id"), primary_key=True),
        sa.Column("item_id", sa.Integer, primary_key=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("media_type", sa.String(100), nullable=False),
        sa.Column("created", TZ, nullable=False),
    )
    op.create_table(
        "login_failures",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("time", TZ, nullable=False),
    )
    op.create_index("ix_login_failures_source", "login_failures", ["source"])


def downgrade() -> None:
    for table in (
        "login_failures",
        "items",
        "package_recipients",
        "packages",
        "tokens",
        "members",
        "facilities",
    ):
        op.drop_table(table)
