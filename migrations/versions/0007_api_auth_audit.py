"""api users, worker heartbeats, tokens, sessions, login attempts, audit address, study identifier hashes

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'user',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('role', sa.String(length=16), nullable=False),
        sa.Column('password_hash', sa.String(length=255), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_user')),
        sa.UniqueConstraint('name', name=op.f('uq_user_name')),
    )
    op.create_table(
        'api_token',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('user_id', sa.Integer(), nullable=False),
        sa.Column('token_hash', sa.String(length=64), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['user_id'], ['user.id'], name=op.f('fk_api_token_user_id_user'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_api_token')),
        sa.UniqueConstraint('token_hash', name=op.f('uq_api_token_token_hash')),
    )
    op.create_index(op.f('ix_api_token_user_id'), 'api_token', ['user_id'], unique=False)
    op.create_table(
        'web_session',
        sa.Column('id', sa.String(length=64), nullable=False),
        sa.Column('user_id', sa.Integer(), nullable=False),
        sa.Column('csrf_token', sa.String(length=64), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('address', sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(['user_id'], ['user.id'], name=op.f('fk_web_session_user_id_user'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_web_session')),
    )
    op.create_index(op.f('ix_web_session_user_id'), 'web_session', ['user_id'], unique=False)
    op.create_table(
        'login_attempt',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('address', sa.String(length=64), nullable=True),
        sa.Column('at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_login_attempt')),
    )
    op.create_index(op.f('ix_login_attempt_name'), 'login_attempt', ['name'], unique=False)
    op.create_index(op.f('ix_login_attempt_address'), 'login_attempt', ['address'], unique=False)
    op.create_index(op.f('ix_login_attempt_at'), 'login_attempt', ['at'], unique=False)
    op.create_table(
        'worker_beat',
        sa.Column('name', sa.String(length=255), nullable=False),
        sa.Column('queues', sa.String(length=255), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('seen_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('name', name=op.f('pk_worker_beat')),
    )
    op.create_index(op.f('ix_worker_beat_seen_at'), 'worker_beat', ['seen_at'], unique=False)
    with op.batch_alter_table('event', schema=None) as batch_op:
        batch_op.add_column(sa.Column('address', sa.String(length=64), nullable=True))
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.add_column(sa.Column('accession_hash', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('patient_id_hash', sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_study_accession_hash'), ['accession_hash'], unique=False)
        batch_op.create_index(batch_op.f('ix_study_patient_id_hash'), ['patient_id_hash'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_study_patient_id_hash'))
        batch_op.drop_index(batch_op.f('ix_study_accession_hash'))
        batch_op.drop_column('patient_id_hash')
        batch_op.drop_column('accession_hash')
    with op.batch_alter_table('event', schema=None) as batch_op:
        batch_op.drop_column('address')
    op.drop_index(op.f('ix_worker_beat_seen_at'), table_name='worker_beat')
    op.drop_table('worker_beat')
    op.drop_index(op.f('ix_login_attempt_at'), table_name='login_attempt')
    op.drop_index(op.f('ix_login_attempt_address'), table_name='login_attempt')
    op.drop_index(op.f('ix_login_attempt_name'), table_name='login_attempt')
    op.drop_table('login_attempt')
    op.drop_index(op.f('ix_web_session_user_id'), table_name='web_session')
    op.drop_table('web_session')
    op.drop_index(op.f('ix_api_token_user_id'), table_name='api_token')
    op.drop_table('api_token')
    op.drop_table('user')
