"""Alembic environment: migrations run on the connection handed in by ``dicom_node.store.database.migrate``."""

from alembic import context

from dicom_node.store.schema import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
