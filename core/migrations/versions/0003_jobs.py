"""jobs: outbox send_started_at, job_runs run_key, outbox by campaign

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 14:58:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("send_started_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_outbox_campaign", ["campaign_id"], unique=False)
    with op.batch_alter_table("job_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("run_key", sa.String(length=200), nullable=True))
        batch_op.create_index("uq_job_runs_run_key", ["run_key"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("job_runs", schema=None) as batch_op:
        batch_op.drop_index("uq_job_runs_run_key")
        batch_op.drop_column("run_key")
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_index("ix_outbox_campaign")
        batch_op.drop_column("send_started_at")
