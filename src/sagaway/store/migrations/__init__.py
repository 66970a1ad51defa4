"""Numbered schema migrations shipped in the package, one folder per SQL dialect.

Files are named ``NNNN_description.sql`` and applied in order, each once; the backends record
applied versions in ``sagaway_migrations`` and take a lock first so two processes starting
at once cannot both apply one.
"""

from __future__ import annotations

from importlib import resources

__all__ = ["migration_files"]


def migration_files(dialect: str) -> list[tuple[int, str, str]]:
    """(version, file name, SQL text) of every migration for ``dialect``, in order."""
    folder = resources.files(f"sagaway.store.migrations.{dialect}")
    out = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            out.append((int(entry.name.split("_", 1)[0]), entry.name, entry.read_text()))
    return sorted(out)
