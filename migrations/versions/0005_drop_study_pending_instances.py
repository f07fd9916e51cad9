"""drop study.pending_instances

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.drop_column('pending_instances')


def downgrade() -> None:
    with op.batch_alter_table('study', schema=None) as batch_op:
        # Rows that exist by then get 0: the counter was never read.
        batch_op.add_column(sa.Column('pending_instances', sa.INTEGER(), nullable=False, server_default='0'))
