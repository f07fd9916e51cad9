"""dashboard: keyset indexes (state, id) for studies and jobs, time indexes for its counts and filters, replay_of,
(state, updated_at) for failing sends, (kind, at) for the audit log; an SR output's findings

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('event', schema=None) as batch_op:
        batch_op.create_index('ix_event_kind_at', ['kind', 'at'], unique=False)

    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_job_state'))
        batch_op.create_index(batch_op.f('ix_job_done_at'), ['done_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_job_replay_of'), ['replay_of'], unique=False)
        batch_op.create_index('ix_job_state_id', ['state', 'id'], unique=False)
        batch_op.create_index('ix_job_updated_at_state', ['updated_at', 'state'], unique=False)

    with op.batch_alter_table('output', schema=None) as batch_op:
        batch_op.add_column(sa.Column('findings', sa.JSON(), nullable=True))

    with op.batch_alter_table('send', schema=None) as batch_op:
        batch_op.create_index('ix_send_state_updated_at', ['state', 'updated_at'], unique=False)

    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.create_index('ix_study_completed_at_state', ['completed_at', 'state'], unique=False)
        batch_op.create_index(batch_op.f('ix_study_first_received_at'), ['first_received_at'], unique=False)
        batch_op.create_index('ix_study_state_id', ['state', 'id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.drop_index('ix_study_state_id')
        batch_op.drop_index(batch_op.f('ix_study_first_received_at'))
        batch_op.drop_index('ix_study_completed_at_state')

    with op.batch_alter_table('send', schema=None) as batch_op:
        batch_op.drop_index('ix_send_state_updated_at')

    with op.batch_alter_table('output', schema=None) as batch_op:
        batch_op.drop_column('findings')

    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_index('ix_job_updated_at_state')
        batch_op.drop_index('ix_job_state_id')
        batch_op.drop_index(batch_op.f('ix_job_replay_of'))
        batch_op.drop_index(batch_op.f('ix_job_done_at'))
        batch_op.create_index(batch_op.f('ix_job_state'), ['state'], unique=False)

    with op.batch_alter_table('event', schema=None) as batch_op:
        batch_op.drop_index('ix_event_kind_at')
