"""output sop_instance_uid index

Before a job's objects are stored, the engine looks up what earlier jobs wrote under the same
SOP Instance UIDs (node/engine/revisions.py): one indexed lookup per kind of object.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03
"""
from collections.abc import Sequence

from alembic import op


revision: str = '0011'
down_revision: str | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('output', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_output_sop_instance_uid'), ['sop_instance_uid'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('output', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_output_sop_instance_uid'))
