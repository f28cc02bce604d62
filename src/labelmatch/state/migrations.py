"""Versioned SQL schemas: ordered migrations, applied once, safe when several processes start together.

A schema is a list of migrations; migration ``i`` brings it from version ``i`` to ``i + 1``. A
one-row table per schema (``version_table``) records the version reached. Opening a store applies
the missing migrations in order inside one transaction; a database newer than the code is refused.

Several replicas may open the same empty PostgreSQL database at the same moment: the migration
transaction first takes a transaction-scoped advisory lock (``pg_advisory_xact_lock``) keyed by
the schema, then re-reads the version, so exactly one applies each migration. (A SQLite file
serves one replica; its writers are serialised by SQLite's own file lock.)
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any

from labelmatch.core.errors import ConfigError

#: A migration: SQL statements (portable: SQLite and PostgreSQL), or a callable given the connection.
Migration = Sequence[str] | Callable[[Any], None]


def schema_version(conn: Any, version_table: str) -> int:
    """The version recorded in ``version_table`` (0 when the table does not exist)."""
    from sqlalchemy import inspect, text

    if not inspect(conn).has_table(version_table):
        return 0
    return int(conn.execute(text(f"SELECT version FROM {version_table}")).scalar_one())


def migrate(engine: Any, version_table: str, migrations: Sequence[Migration], what: str) -> int:
    """Apply the missing ``migrations`` in one transaction; return the schema version.

    Args:
        engine: A SQLAlchemy engine.
        version_table: The one-row table holding this schema's version.
        migrations: The ordered migrations.
        what: What the schema is, for messages (``"feedback store sqlite:///f.db"``).

    Raises:
        ConfigError: The database holds a newer schema than ``migrations`` describe.
    """
    from sqlalchemy import text

    latest = len(migrations)
    with engine.connect() as conn:
        current = schema_version(conn, version_table)
    if current == latest:
        return current
    if current > latest:
        raise ConfigError(f"{what}: schema version {current} is newer than this labelmatch understands "
                          f"({latest}); upgrade labelmatch")
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            key = zlib.crc32(version_table.encode())
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
        current = schema_version(conn, version_table)  # another process may have migrated meanwhile
        if current == 0:
            conn.execute(text(f"CREATE TABLE {version_table} (version INTEGER NOT NULL)"))
            conn.execute(text(f"INSERT INTO {version_table} (version) VALUES (0)"))
        for migration in migrations[current:]:
            if callable(migration):
                migration(conn)
            else:
                for statement in migration:
                    conn.execute(text(statement))
        conn.execute(text(f"UPDATE {version_table} SET version = :v"), {"v": latest})
    return latest
