"""dashboard at scale: index-only latency and campaign-result reads, funnel index in journey order

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 18:10:00.000000

- ix_transitions_moves: the step changes only (partial), every column the latency page reads.
- ix_transitions_session_at replaces ix_transitions_session: a session's transitions by WhatsApp time,
  with outcome and from_step, so campaign results check replies and recoveries from the index alone.
- ix_step_reach_journeys replaces ix_step_reach_flow_entered: the same rows in journey order.
- PostgreSQL: autovacuum after every 10,000 inserts into transitions and the funnel rollup (by default an
  append-only table is vacuumed after growing by 20%), so the pages of recent days are marked all-visible
  and index-only scans of them do not fall back to reading the table.

CREATE INDEX blocks writes to the table while it builds (about 15 s per index for 10 M transitions on two
cores). On a large live database, build the new indexes first with CREATE INDEX CONCURRENTLY and the
definitions below (sql/schema.postgresql.sql): this migration then skips them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

MOVES = "outcome IN ('advanced', 'completed', 'handoff') AND elapsed_seconds IS NOT NULL"
AUTOVACUUM = "autovacuum_vacuum_insert_threshold = 10000, autovacuum_vacuum_insert_scale_factor = 0"


def upgrade() -> None:
    with op.batch_alter_table("transitions", schema=None) as batch_op:
        batch_op.create_index(
            "ix_transitions_moves",
            ["at", "id"],
            unique=False,
            if_not_exists=True,
            postgresql_include=["flow", "phone_number_id", "language", "from_step", "to_step", "elapsed_seconds"],
            postgresql_where=sa.text(MOVES),
            sqlite_where=sa.text(MOVES),
        )
        batch_op.create_index(
            "ix_transitions_session_at",
            ["phone_number_id", "user_id", "at"],
            unique=False,
            if_not_exists=True,
            postgresql_include=["outcome", "from_step"],
        )
        batch_op.drop_index("ix_transitions_session")
    with op.batch_alter_table("analytics_step_reach", schema=None) as batch_op:
        batch_op.create_index(
            "ix_step_reach_journeys",
            ["flow", "entered_at", "phone_number_id", "user_id"],
            unique=False,
            if_not_exists=True,
            postgresql_include=["step", "first_at"],
        )
        batch_op.drop_index("ix_step_reach_flow_entered")
    if op.get_context().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE transitions SET ({AUTOVACUUM})")
        op.execute(f"ALTER TABLE analytics_step_reach SET ({AUTOVACUUM})")


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        for table in ("transitions", "analytics_step_reach"):
            op.execute(
                f"ALTER TABLE {table} RESET (autovacuum_vacuum_insert_threshold, autovacuum_vacuum_insert_scale_factor)"
            )
    with op.batch_alter_table("analytics_step_reach", schema=None) as batch_op:
        batch_op.create_index(
            "ix_step_reach_flow_entered",
            ["flow", "entered_at"],
            unique=False,
            postgresql_include=["phone_number_id", "user_id", "step", "first_at"],
        )
        batch_op.drop_index("ix_step_reach_journeys")
    with op.batch_alter_table("transitions", schema=None) as batch_op:
        batch_op.create_index("ix_transitions_session", ["phone_number_id", "user_id", "id"], unique=False)
        batch_op.drop_index("ix_transitions_session_at")
        batch_op.drop_index("ix_transitions_moves")
