"""agent usage on workers; rate-limit governor state

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from orchestrator.db.models import UTCDateTime


revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('rate_limits',
    sa.Column('account', sa.String(length=64), nullable=False),
    sa.Column('until', UTCDateTime(), nullable=False),
    sa.Column('failures', sa.Integer(), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('updated_at', UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('account', name=op.f('pk_rate_limits'))
    )
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('cost_usd', sa.Float(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('input_tokens', sa.BigInteger(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('output_tokens', sa.BigInteger(), server_default='0', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.drop_column('output_tokens')
        batch_op.drop_column('input_tokens')
        batch_op.drop_column('cost_usd')
    op.drop_table('rate_limits')
