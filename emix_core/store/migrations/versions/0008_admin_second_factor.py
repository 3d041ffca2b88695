"""Administrators' second factor: their authenticator (TOTP) secrets, sealed; their
one-time recovery codes, hashed with Argon2id; and the time a browser session passed it.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "admin_factors",
        sa.Column("member_id", sa.Integer, sa.ForeignKey("members.id"), primary_key=True),
        sa.Column("wrapped_key", sa.LargeBinary, nullable=False),
        sa.Column("secret", sa.LargeBinary, nullable=False),
        sa.Column("created", TZ, nullable=False),
        sa.Column("enrolled_at", TZ, nullable=True),
        sa.Column("last_step", sa.BigInteger, nullable=True),
    )
    op.create_table(
        "recovery_codes",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("member_id", sa.Integer, sa.ForeignKey("members.id"), nullable=False),
        sa.Column("code_hash", sa.String(200), nullable=False),
        sa.Column("used_at", TZ, nullable=True),
    )
    op.create_index("ix_recovery_codes_member_id", "recovery_codes", ["member_id"])
    # sessions open before the upgrade have not passed a second factor
    op.add_column("web_sessions", sa.Column("second_factor_at", TZ, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("web_sessions") as batch:
        batch.drop_column("second_factor_at")
    op.drop_index("ix_recovery_codes_member_id", table_name="recovery_codes")
    op.drop_table("recovery_codes")
    op.drop_table("admin_factors")
