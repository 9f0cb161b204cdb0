"""in-progress sessions: partial indexes for the stalled, state and campaign reads that cover archived sessions

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 01:30:00.000000

Archived means idle, not gone (core/lifecycle.py): every stalled, state and campaign read now covers sessions
archived while active. In production most sessions are archived (the archive job takes everyone silent for
24 h), most of them finished, so neither (status, last_inbound_at) nor (flow, current_step, updated_at) finds
the sessions still in progress without reading the table. Both new indexes hold only those
(`status = 'active' OR (status = 'archived' AND archived_from = 'active')`, the predicate core.lifecycle
spells with literals so the planner can prove it):

- ix_sessions_in_progress: by last message, with every column the stalled page and the state distribution
  read (covering on PostgreSQL): the stalled list is the first rows of an index-only scan, its count and the
  state distribution index-only scans.
- ix_sessions_step_in_progress: (flow, step, last message): campaign preview and the follow-up job's selection
  read one step's sessions, oldest stall first.

Measured at 1 M sessions (99 % archived) / 10 M transitions on two cores (bench/dashboard.py): stalled list
0.30 -> 0.01 s, its count 0.14 -> 0.07 s, state distribution 0.45 -> 0.13 s (README, Benchmarks). Each index
is written on every update of a session in progress (the apply path changes last_inbound_at, so those updates
are not HOT anyway): two more index entries per applied message.

CREATE INDEX blocks writes to the table while it builds (a few seconds for 1 M sessions on two cores). On a
large live database, build the new indexes first with CREATE INDEX CONCURRENTLY and the definitions below
(sql/schema.postgresql.sql): this migration then skips them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

IN_PROGRESS = "status = 'active' OR (status = 'archived' AND archived_from = 'active')"


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


def downgrade() -> None:
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.drop_index("ix_sessions_step_in_progress")
        batch_op.drop_index("ix_sessions_in_progress")
