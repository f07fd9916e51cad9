"""validation checks and storage commitment

output.checks: which checks of the validation gate ran on each result object.
send.commitment_uid: the Storage Commitment transaction that names the object; the
new send state 'committing' fits the existing VARCHAR(16) (a non-native enum).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('output', schema=None) as batch_op:
        batch_op.add_column(sa.Column('checks', sa.JSON(), nullable=True))

    with op.batch_alter_table('send', schema=None) as batch_op:
        batch_op.add_column(sa.Column('commitment_uid', sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_send_commitment_uid'), ['commitment_uid'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('send', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_send_commitment_uid'))
        batch_op.drop_column('commitment_uid')

    with op.batch_alter_table('output', schema=None) as batch_op:
        batch_op.drop_column('checks')
