"""indexes for claiming: pending order with priority descending, unbound allocations, an
engine's pending jobs per depth

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index('ix_jobs_engine_status', table_name='jobs')
    op.create_index('ix_jobs_engine_status', 'jobs', ['engine_id', 'status', 'depth'], unique=False)
    op.drop_index('ix_jobs_pending_order', table_name='jobs')
    op.create_index(
        'ix_jobs_pending_order', 'jobs', ['status', 'depth', sa.text('priority DESC'), 'created_at'], unique=False
    )
    op.create_index(
        'ix_allocations_unbound',
        'allocations',
        ['job_id'],
        unique=False,
        sqlite_where=sa.text('slots > bound'),
        postgresql_where=sa.text('slots > bound'),
    )


def downgrade() -> None:
    op.drop_index('ix_jobs_engine_status', table_name='jobs')
    op.create_index('ix_jobs_engine_status', 'jobs', ['engine_id', 'status'], unique=False)
    op.drop_index('ix_allocations_unbound', table_name='allocations')
    op.drop_index('ix_jobs_pending_order', table_name='jobs')
    op.create_index('ix_jobs_pending_order', 'jobs', ['status', 'depth', 'priority', 'created_at'], unique=False)
