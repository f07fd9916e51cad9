"""validation checks

output.checks: which checks of the validation gate ran on each result object.

Revision ID: 0010
Revises: 0007
Create Date: 2026-12-02
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0010'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('output', schema=None) as batch_op:
        batch_op.add_column(sa.Column('checks', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('output', schema=None) as batch_op:
        batch_op.drop_column('checks')
