"""integrations: each job's result branch and its progress; repository locks for SQLite

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from orchestrator.db.models import UTCDateTime

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'integrations',
        sa.Column('job_id', sa.String(length=32), nullable=False),
        sa.Column('repository', sa.Text(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('branch', sa.Text(), nullable=False),
        sa.Column('base_commit', sa.String(length=64), nullable=True),
        sa.Column('commit', sa.String(length=64), nullable=True),
        sa.Column('merged', sa.JSON(), nullable=False),
        sa.Column('conflicts', sa.JSON(), nullable=False),
        sa.Column('reason', sa.Text(), nullable=True),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('engine_id', sa.String(length=32), nullable=True),
        sa.Column('created_at', UTCDateTime(), nullable=False),
        sa.Column('updated_at', UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_integrations_job_id_jobs')),
        sa.PrimaryKeyConstraint('job_id', name=op.f('pk_integrations')),
    )
    op.create_index(op.f('ix_integrations_repository'), 'integrations', ['repository'], unique=False)
    op.create_index(op.f('ix_integrations_status'), 'integrations', ['status'], unique=False)
    op.create_table(
        'repository_locks',
        sa.Column('repository', sa.Text(), nullable=False),
        sa.Column('engine_id', sa.String(length=32), nullable=False),
        sa.Column('acquired_at', UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint('repository', name=op.f('pk_repository_locks')),
    )


def downgrade() -> None:
    op.drop_table('repository_locks')
    op.drop_index(op.f('ix_integrations_status'), table_name='integrations')
    op.drop_index(op.f('ix_integrations_repository'), table_name='integrations')
    op.drop_table('integrations')
