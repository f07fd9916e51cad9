"""Send: confirmed_at (read-back by C-FIND/QIDO-RS) and the STORED state

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 15:29:18.892279

STORED (accepted, read-back pending) is a new value of the non-native send state enum; it needs
no DDL, but a downgrade turns it into SENT, which is what it means to code without read-back.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('send', schema=None) as batch_op:
        batch_op.add_column(sa.Column('confirmed_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.execute("UPDATE send SET state = 'SENT' WHERE state = 'STORED'")
    with op.batch_alter_table('send', schema=None) as batch_op:
        batch_op.drop_column('confirmed_at')
