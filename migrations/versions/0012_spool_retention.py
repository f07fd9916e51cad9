"""spool retention: study.purged_at, output.sha256

study.purged_at: when storage.retention_days removed the study's files from the spool (its
rows stay). output.sha256: the digest of each result object's bytes, so that a later job can
tell whether it writes the same bytes under a UID (node/engine/revisions.py) once the file is gone.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0012'
down_revision: str | None = '0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.add_column(sa.Column('purged_at', sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table('output', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sha256', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('output', schema=None) as batch_op:
        batch_op.drop_column('sha256')
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.drop_column('purged_at')
