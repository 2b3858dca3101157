"""Pull mode: the series each [[sources]] PACS reported and pulled (pulled_series), and
each source's polls (source_polls)."""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    op.create_table(
        "pulled_series",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("series_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("reported_instances", sa.Integer(), nullable=True),
        sa.Column("changed_at", sa.DateTime(), nullable=False),
        sa.Column("pulled_at", sa.DateTime(), nullable=True),
        sa.Column("pulled_instances", sa.Integer(), nullable=False),
    )
    op.create_index("ix_pulled_series_study_instance_uid", "pulled_series", ["study_instance_uid"])
    op.create_table(
        "source_polls",
        sa.Column("source", sa.String(16), primary_key=True),
        sa.Column("succeeded_from", sa.DateTime(), nullable=True),
        sa.Column("attempted_at", sa.DateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("claimed_by", sa.String(128), nullable=True),
        sa.Column("claimed_until", sa.DateTime(), nullable=True),
    )
