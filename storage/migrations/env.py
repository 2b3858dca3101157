"""Alembic's environment for ichnode's schema: migrations run on the connection that
`storage.schema.prepare` hands over, inside its transaction and under its lock, so a
schema check and an upgrade are one step however many processes start at once. Run them
with `ichnode db upgrade` (or let `serve`/`worker` do it at start-up)."""

from alembic import context

from storage.db import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("ichnode's migrations run through `ichnode db upgrade`, not the alembic command")
context.configure(connection=connection, target_metadata=Base.metadata)
with context.begin_transaction():
    context.run_migrations()
