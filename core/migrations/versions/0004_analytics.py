"""analytics: step-reach rollup for funnels, its watermark, indexes for the dashboard's time series

Revision ID: 0004
Revises: 0002
Create Date: 2026-11-23 15:03:17.507123
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "analytics_step_reach",
        sa.Column("phone_number_id", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("flow", sa.String(length=100), nullable=False),
        sa.Column("step", sa.String(length=100), nullable=False),
        sa.Column("first_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("entered_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("phone_number_id", "user_id", "flow", "step"),
    )
    with op.batch_alter_table("analytics_step_reach", schema=None) as batch_op:
        batch_op.create_index(
            "ix_step_reach_flow_entered",
            ["flow", "entered_at"],
            unique=False,
            postgresql_include=["phone_number_id", "user_id", "step", "first_at"],
        )

    with op.batch_alter_table("transitions", schema=None) as batch_op:
        batch_op.create_index("ix_transitions_outcome_at", ["outcome", "at"], unique=False)
    with op.batch_alter_table("inbound_events", schema=None) as batch_op:
        batch_op.create_index("ix_inbound_timestamp", ["timestamp"], unique=False)

    op.create_table(
        "analytics_watermarks",
        sa.Column("name", sa.String(length=50), nullable=False),
        sa.Column("last_id", sa.BigInteger(), nullable=False),
        sa.Column("refreshed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("analytics_watermarks")
    with op.batch_alter_table("inbound_events", schema=None) as batch_op:
        batch_op.drop_index("ix_inbound_timestamp")
    with op.batch_alter_table("transitions", schema=None) as batch_op:
        batch_op.drop_index("ix_transitions_outcome_at")
    with op.batch_alter_table("analytics_step_reach", schema=None) as batch_op:
        batch_op.drop_index("ix_step_reach_flow_entered")
    op.drop_table("analytics_step_reach")
