"""A study is held while an association that sent its latest instance is open
(studies.held_until, renewed by the receiving process, cleared when the association
ends), so a sender that pauses, or whose association a crash cut, is not taken for a
finished study."""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.add_column("studies", sa.Column("held_until", sa.DateTime(), nullable=True))
