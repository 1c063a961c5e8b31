"""job versions cover exact instances; process leases; receive time per version; study description

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 17:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('node_processes',
    sa.Column('token', sa.String(length=32), nullable=False),
    sa.Column('host', sa.String(length=128), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('roles', sa.String(length=64), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=False),
    sa.Column('lease_until', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('token')
    )
    with op.batch_alter_table('node_processes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_node_processes_lease_until'), ['lease_until'], unique=False)

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('last_instance_pk', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('instance_count', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('instances_digest', sa.String(length=64), server_default='', nullable=False))

    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.add_column(sa.Column('receiving_since', sa.DateTime(), nullable=True))
    op.execute("UPDATE series SET receiving_since = first_received_at")

    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('study_description', sa.String(length=64), server_default='', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_column('study_description')

    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_column('receiving_since')

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('instances_digest')
        batch_op.drop_column('instance_count')
        batch_op.drop_column('last_instance_pk')

    with op.batch_alter_table('node_processes', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_node_processes_lease_until'))

    op.drop_table('node_processes')
