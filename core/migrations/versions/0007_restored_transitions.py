"""restored transitions: a returning archived user's message is applied, and the log says it restored the session

Revision ID: 0007
Revises: 0005, 0006
Create Date: 2026-11-30 01:00:00.000000

- transitions.restored (boolean, default false): the message brought an archived session back. Its outcome says
  what the message itself did ("advanced" when it answered the step the user was in, "restored" when it only
  woke the session and got the welcome back), so funnels and latency count answers on return as going on.
- waflow_write v2 (sql/functions/waflow_write.v2.sql) writes that column. Adding a column with a constant
  default is a catalog change on PostgreSQL 11+, no table rewrite.

Also joins the two heads (0005: dashboard indexes, 0006: apply functions) so later revisions have one parent.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = ("0005", "0006")
branch_labels = None
depends_on = None

FUNCTIONS = Path(__file__).resolve().parents[3] / "sql" / "functions"


def upgrade() -> None:
    with op.batch_alter_table("transitions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("restored", sa.Boolean(), server_default=sa.false(), nullable=False))
    if op.get_context().dialect.name == "postgresql":
        op.execute((FUNCTIONS / "waflow_write.v2.sql").read_text())


def downgrade() -> None:
    with op.batch_alter_table("transitions", schema=None) as batch_op:
        batch_op.drop_column("restored")
