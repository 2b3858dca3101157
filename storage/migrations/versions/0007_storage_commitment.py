"""Storage Commitment for destinations with commitment = true: a delivery remembers the
Transaction UID of its latest N-ACTION (the destination's N-EVENT-REPORT names it) and
when every object was reported committed. The new state `committing` needs no change:
the state column is a plain string."""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("transaction_uid", sa.String(64), nullable=True))
        batch.add_column(sa.Column("committed_at", sa.DateTime(), nullable=True))
        batch.create_index("ix_deliveries_transaction_uid", ["transaction_uid"])
