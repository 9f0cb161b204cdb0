"""quarantine and audit: messages we cannot take or apply are held with the reason; operator actions are logged

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 01:45:00.000000

- quarantine: one row per poison message (a value out of bounds at intake, or a message that failed to apply
  APPLY_MAX_ATTEMPTS times), held until an operator retries or drops it (`python -m core quarantine`).
- inbound_events.apply_attempts / apply_error: failed applies so far and the last error, for bounded retries.
  Adding columns with a constant default is a catalog change on PostgreSQL 11+, no table rewrite.
- audit_log: who did what to which user or message, when and why.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def _big_id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    json = sa.JSON().with_variant(sa.dialects.postgresql.JSONB(), "postgresql")
    op.create_table(
        "quarantine",
        sa.Column("id", _big_id(), autoincrement=True, nullable=False),
        sa.Column("stage", sa.String(length=16), nullable=False),
        sa.Column("phone_number_id", sa.String(length=64), nullable=True),
        sa.Column("user_id", sa.String(length=128), nullable=True),
        sa.Column("wamid", sa.String(length=256), nullable=True),
        sa.Column("event_id", sa.BigInteger(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=True),
        sa.Column("fingerprint", sa.String(length=80), nullable=False),
        sa.Column("seen", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolved_by", sa.String(length=100), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("fingerprint"),
    )
    op.create_index("ix_quarantine_status_seen", "quarantine", ["status", "last_seen_at"], unique=False)
    op.create_table(
        "audit_log",
        sa.Column("id", _big_id(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=100), nullable=False),
        sa.Column("action", sa.String(length=50), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("details", json, nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"], unique=False)
    with op.batch_alter_table("inbound_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("apply_attempts", sa.Integer(), server_default=sa.text("0"), nullable=False))
        batch_op.add_column(sa.Column("apply_error", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("inbound_events", schema=None) as batch_op:
        batch_op.drop_column("apply_error")
        batch_op.drop_column("apply_attempts")
    op.drop_index("ix_audit_log_at", table_name="audit_log")
    op.drop_table("audit_log")
    op.drop_index("ix_quarantine_status_seen", table_name="quarantine")
    op.drop_table("quarantine")
