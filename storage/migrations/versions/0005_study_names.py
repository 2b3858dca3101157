"""What names a study to a person when it has no accession number: its StudyDate,
Modality and StudyDescription, kept from the first instance that has each (studies
received before this revision show their received date and UID instead)."""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("study_date", sa.String(8), nullable=False, server_default=""))
        batch.add_column(sa.Column("modality", sa.String(16), nullable=False, server_default=""))
        batch.add_column(sa.Column("study_description", sa.String(64), nullable=False, server_default=""))
