"""The schema of the releases before migrations (ichnode_schema.version = 3).

A database those releases created is stamped with this revision, not re-created: the
tables below are exactly theirs (tests/test_migrations.py compares them with a database
those releases made)."""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def _outgoing() -> list[sa.Column]:
    """What every row of an outgoing queue kept in schema 3."""
    return [
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("sent_at", sa.DateTime(), nullable=True),
    ]


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("accession_number", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("first_received_at", sa.DateTime(), nullable=False),
        sa.Column("last_received_at", sa.DateTime(), nullable=False),
        sa.Column("instance_count", sa.Integer(), nullable=False),
        sa.Column("claimed_by", sa.String(128), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("retries", sa.Integer(), nullable=False),
        sa.Column("retry_at", sa.DateTime(), nullable=True),
        sa.Column("analyses", sa.Integer(), nullable=False),
        sa.Column("purged_at", sa.DateTime(), nullable=True),
        sa.Column("verdict", sa.String(32), nullable=True),
        sa.Column("study_score", sa.Float(), nullable=True),
        sa.Column("result_series_uid", sa.String(64), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_studies_study_instance_uid", "studies", ["study_instance_uid"], unique=True)
    op.create_index("ix_studies_state", "studies", ["state"])
    op.create_index("ix_studies_last_received_at", "studies", ["last_received_at"])
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("modality", sa.String(16), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("calling_aet", sa.String(16), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("study_id", "series_instance_uid", "sop_instance_uid"),
    )
    op.create_index("ix_instances_sop_instance_uid", "instances", ["sop_instance_uid"])
    op.create_index("ix_instances_study_id", "instances", ["study_id"])
    op.create_index("ix_instances_series_instance_uid", "instances", ["series_instance_uid"])
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("result_folder", sa.Text(), nullable=False),
        sa.Column("priority_high", sa.Boolean(), nullable=False),
        *_outgoing(),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "notifications",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        *_outgoing(),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    for table in ("deliveries", "notifications"):
        for column in ("state", "next_attempt_at", "study_id"):
            op.create_index(f"ix_{table}_{column}", table, [column])
    # The version marker of the releases before migrations.
    schema = op.create_table("ichnode_schema", sa.Column("version", sa.Integer(), nullable=False),
                             sa.PrimaryKeyConstraint("version"))
    op.bulk_insert(schema, [{"version": 3}])
