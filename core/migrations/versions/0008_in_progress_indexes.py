"""in-progress sessions: partial indexes for the stalled, state and campaign reads that cover archived sessions

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 01:30:00.000000

Archived means idle, not gone (core/lifecycle.py): every stalled, state and campaign read now covers sessions
archived while active. In production most sessions are archived (the archive job takes everyone silent for
24 h), most of them finished, so neither (status, last_inbound_at) nor (flow, current_step, updated_at) finds
the sessions still in progress without reading the table. The two session indexes hold only those
(`status = 'active' OR (status = 'archived' AND archived_from = 'active')`, the predicate core.lifecycle
spells with literals so the planner can prove it):

- ix_sessions_in_progress: by last message, with every column the stalled page and the state distribution
  read (covering on PostgreSQL): the stalled list is the first rows of an index-only scan, its count and the
  state distribution index-only scans.
- ix_sessions_step_in_progress: (flow, step, last message): campaign preview and the follow-up job's selection
  read one step's sessions, oldest stall first.
- ix_outbox_window_closed: the outbox messages refused for a closed 24 h window (error 131047), a handful. The
  follow-up job asks it, for every session stalled in the campaign's step (archived ones included: tens of
  thousands), whether the follow-up of this stall failed so; it read each follow-up's outbox row instead
  (selection of one campaign 0.64-0.96 -> 0.38-0.53 s on a loaded machine).
- PostgreSQL: extended statistics on sessions (flow, current_step). A step belongs to one flow, but the
  planner multiplies the two selectivities and expects half the sessions of a step: campaign preview then
  read every session in the step (a bitmap scan of the whole table) and sorted them instead of walking
  ix_sessions_step_in_progress to its 10,000-row limit (0.28 -> 0.13 s). ANALYZE fills them (a sample of the
  table; it does not block writes).

Measured at 1 M sessions (99 % archived) / 10 M transitions on two cores, load average about 2
(bench/dashboard.py, medians): stalled list 0.39 -> 0.02 s, its count 0.23 -> 0.04 s, state distribution
0.54 -> 0.18 s, campaign preview 0.75 -> 0.40 s, the follow-up job's selection 0.92 -> 0.36 s (README,
Benchmarks). Each session index is written on every update of a session in progress (the apply path changes
last_inbound_at, so those updates are not HOT anyway): two more index entries per applied message; the outbox
index only for messages refused with 131047.

CREATE INDEX blocks writes to the table while it builds (about 2 s for the session indexes at 1 M sessions,
under a second for the outbox one at 850,000 messages, on two cores). On a large live database, build the new
indexes first with CREATE INDEX CONCURRENTLY and the definitions below (sql/schema.postgresql.sql): this
migration then skips them (the statistics are cheap: CREATE STATISTICS and an ANALYZE, which does not block
writes).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

IN_PROGRESS = "status = 'active' OR (status = 'archived' AND archived_from = 'active')"
WINDOW_CLOSED = "error_code = 131047"
FLOW_STEP = "CREATE STATISTICS IF NOT EXISTS st_sessions_flow_step (dependencies, mcv) ON flow, current_step FROM sessions"


def upgrade() -> None:
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.create_index(
            "ix_sessions_in_progress",
            ["last_inbound_at", "phone_number_id", "user_id"],
            unique=False,
            if_not_exists=True,
            postgresql_include=["flow", "current_step", "language", "status", "opted_out", "window_closed_at",
                                "step_entered_at", "created_at"],
            postgresql_where=sa.text(IN_PROGRESS),
            sqlite_where=sa.text(IN_PROGRESS),
        )
        batch_op.create_index(
            "ix_sessions_step_in_progress",
            ["flow", "current_step", "last_inbound_at", "phone_number_id", "user_id"],
            unique=False,
            if_not_exists=True,
            postgresql_where=sa.text(IN_PROGRESS),
            sqlite_where=sa.text(IN_PROGRESS),
        )
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.create_index(
            "ix_outbox_window_closed",
            ["id"],
            unique=False,
            if_not_exists=True,
            postgresql_where=sa.text(WINDOW_CLOSED),
            sqlite_where=sa.text(WINDOW_CLOSED),
        )
    if op.get_context().dialect.name == "postgresql":
        op.execute(FLOW_STEP)
        op.execute("ANALYZE sessions")


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("DROP STATISTICS IF EXISTS st_sessions_flow_step")
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_index("ix_outbox_window_closed")
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.drop_index("ix_sessions_step_in_progress")
        batch_op.drop_index("ix_sessions_in_progress")
