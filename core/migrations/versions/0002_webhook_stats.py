"""webhook stats

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 14:43:07.091726
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "webhook_stats",
        sa.Column("bucket", sa.DateTime(timezone=True), nullable=False),
        sa.Column("result", sa.String(length=32), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("bucket", "result"),
    )


def downgrade() -> None:
    op.drop_table("webhook_stats")
