"""One throttle: the API's ``failed_attempts`` and the browser's ``web_attempts`` become
``attempts``, counted under keys (``client:…``, ``credential:…``, ``member:…``).

Rows of the last day are carried over, so a throttle in force stays in force.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "attempts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("key", sa.String(100), nullable=False),
        sa.Column("time", TZ, nullable=False),
    )
    op.create_index("ix_attempts_key", "attempts", ["key"])
    op.create_index("ix_attempts_time", "attempts", ["time"])
    op.execute('INSERT INTO attempts ("key", "time") SELECT "key", "time" FROM web_attempts')
    for column in ("client", "credential"):
        op.execute(
            f'INSERT INTO attempts ("key", "time") SELECT \'{column}:\' || {column}, "time" '
            "FROM failed_attempts"
        )
    op.drop_table("web_attempts")
    op.drop_table("failed_attempts")


def downgrade() -> None:
    op.create_table(
        "failed_attempts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("client", sa.String(64), nullable=False),
        sa.Column("credential", sa.String(64), nullable=False),
        sa.Column("time", TZ, nullable=False),
    )
    op.create_index("ix_failed_attempts_client", "failed_attempts", ["client"])
    op.create_index("ix_failed_attempts_credential", "failed_attempts", ["credential"])
    op.create_index("ix_failed_attempts_time", "failed_attempts", ["time"])
    op.create_table(
        "web_attempts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("key", sa.String(100), nullable=False),
        sa.Column("time", TZ, nullable=False),
    )
    op.create_index("ix_web_attempts_key", "web_attempts", ["key"])
    op.drop_table("attempts")  # counters restart empty: they are an hour's worth at most
