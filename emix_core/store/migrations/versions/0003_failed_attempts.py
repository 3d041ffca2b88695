"""Failed sign-ins counted per client and per credential (throttling shared by every hub
instance); the per-address ``login_failures`` table is no longer used.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "failed_attempts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("client", sa.String(64), nullable=False),
        sa.Column("credential", sa.String(64), nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_failed_attempts_client", "failed_attempts", ["client"])
    op.create_index("ix_failed_attempts_credential", "failed_attempts", ["credential"])
    op.create_index("ix_failed_attempts_time", "failed_attempts", ["time"])


def downgrade() -> None:
    op.drop_table("failed_attempts")
