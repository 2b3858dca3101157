"""Deliveries and notifications are claimed by the process sending them (claimed_by, and
heartbeat_at renewed while it sends), so several `serve` processes never send one twice
at once and a process that dies mid-send is taken over once its claim goes stale.

ichnode_schema.version becomes 4: the releases before migrations read it, and refuse a
database it no longer says 3 for, rather than run on tables they do not know."""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    for table in ("deliveries", "notifications"):
        op.add_column(table, sa.Column("claimed_by", sa.String(128), nullable=True))
        op.add_column(table, sa.Column("heartbeat_at", sa.DateTime(), nullable=True))
    op.execute(sa.text("UPDATE ichnode_schema SET version = 4"))
