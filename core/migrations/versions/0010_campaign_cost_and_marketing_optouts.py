"""campaign cost and marketing opt-outs: Meta's pricing per outbound message, users who stopped marketing

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 02:00:00.000000

- message_status.pricing_category / pricing_billable / pricing_model: the `pricing` object Meta sends with the
  statuses of a message, so campaign results can count billable messages by category.
- marketing_optouts: users who stopped marketing messages from a business number (131050 on a send, or the
  `user_preferences` webhook); marketing templates never go to them.
Adding nullable columns is a catalog change on PostgreSQL, no table rewrite.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("message_status", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pricing_category", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("pricing_billable", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("pricing_model", sa.String(length=32), nullable=True))
    op.create_table(
        "marketing_optouts",
        sa.Column("phone_number_id", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("opted_out_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("phone_number_id", "user_id"),
    )


def downgrade() -> None:
    op.drop_table("marketing_optouts")
    with op.batch_alter_table("message_status", schema=None) as batch_op:
        batch_op.drop_column("pricing_model")
        batch_op.drop_column("pricing_billable")
        batch_op.drop_column("pricing_category")
