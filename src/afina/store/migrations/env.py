"""alembic's entry point for afina's store. `open_store` runs it with an open connection that already
holds the migration lock (`config.attributes["connection"]`). A contributor writing the next
migration runs it against a scratch database by URL:

    python -c "from alembic import command; from afina.store.database import alembic_config; \
        command.revision(alembic_config('sqlite:////tmp/scratch.db'), 'what changes', autogenerate=True)"

then renames the new file `000N_what_changes.py` and sets `revision = "000N"`.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from afina.store.tables import Base

config = context.config


def run_migrations(connection: Connection) -> None:
    # render_as_batch: SQLite alters a table by copying it, which alembic does for a later
    # migration that alters a column or a constraint.
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():  # `upgrade --sql`: the DDL as text, for a database administrator to review
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=Base.metadata,
                      literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
elif (given := config.attributes.get("connection")) is not None:
    run_migrations(given)
else:
    with create_engine(config.get_main_option("sqlalchemy.url")).begin() as opened:
        run_migrations(opened)
