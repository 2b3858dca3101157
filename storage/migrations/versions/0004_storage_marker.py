"""The storage folder's marker (ichnode_store): one random value, also written to
`.ichnode-store` in storage.root, so a process whose storage.root is not the folder the
database's files are in (another mount, a typo) is refused before it claims work whose
files it cannot see."""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.create_table("ichnode_store", sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
                    sa.Column("marker", sa.String(64), nullable=False))
