"""Versioned schema migrations, shared by the SQLite and PostgreSQL stores.

Each store keeps its files in its own ``migrations/`` folder, named
``NNNN_description.sql``. They are applied in order, each in its own
transaction together with its row in ``schema_migrations``; the checksum of
every applied file is recorded, and a file changed after it was applied stops
the server (edit by adding a new migration, never by rewriting an old one).
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
from dataclasses import dataclass
from importlib import resources

from memsvc.config import StartupError

_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")


class MigrationError(StartupError):
    """The database's schema history does not match this build's migrations (a
    start-up failure its message explains: no traceback)."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(package: str) -> list[Migration]:
    """Read ``<package>/migrations/*.sql`` in version order."""
    folder = resources.files(package) / "migrations"
    migrations = []
    for entry in folder.iterdir():
        match = _NAME.fullmatch(entry.name)
        if match:
            # UTF-8 whatever the locale: the checksum of the same file must not vary.
            migrations.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
        elif entry.name.endswith(".sql"):
            raise MigrationError(f"migration file {entry.name!r} is not named NNNN_name.sql")
    migrations.sort(key=lambda m: m.version)
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise MigrationError(f"migration versions must run 1, 2, 3... without gaps: {versions}")
    return migrations


def check_applied(migration: Migration, recorded_checksum: str) -> None:
    """Refuse to run against a database where this migration's file differed."""
    if recorded_checksum != migration.checksum:
        raise MigrationError(
            f"migration {migration.version:04d}_{migration.name} was changed after it was "
            "applied to this database: this memsvc's schema history differs from the one "
            "that built it (a build from before a release). Run the memsvc that built it, "
            "or start on a new database; a developer who changed the file: restore it and "
            "add a new migration instead"
        )


def split_sql(script: str) -> list[str]:
    """Split a SQL script into complete statements (triggers included)."""
    statements: list[str] = []
    current: list[str] = []
    for line in script.splitlines(keepends=True):
        current.append(line)
        candidate = "".join(current)
        if sqlite3.complete_statement(candidate):
            if candidate.strip():
                statements.append(candidate.strip())
            current = []
    rest = "".join(current).strip()
    if rest and not all(
        line.strip().startswith("--") or not line.strip() for line in rest.splitlines()
    ):
        raise MigrationError(f"incomplete SQL statement at the end of a migration: {rest[:80]!r}")
    return statements
