"""Short-lived records kept by plugins (OAuth transactions and sessions of SMART launches).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "plugin_records",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("namespace", sa.String(64), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("group_name", sa.String(128), nullable=True),
        sa.Column("value", sa.LargeBinary, nullable=False),
        sa.Column("expires", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("namespace", "key_hash"),
    )
    op.create_index("ix_plugin_records_expires", "plugin_records", ["expires"])
    op.create_index("ix_plugin_records_group_name", "plugin_records", ["group_name"])


def downgrade() -> None:
    op.drop_index("ix_plugin_records_group_name", table_name="plugin_records")
    op.drop_index("ix_plugin_records_expires", table_name="plugin_records")
    op.drop_table("plugin_records")
