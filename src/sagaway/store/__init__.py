"""Saga stores: the port (``base``) and its backends, built from a URL here.

This is the composition root for stores: a backend's module (and its driver) is imported
only when its URL scheme is used, so ``pip install sagaway`` stays small.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sagaway.errors import StoreError

if TYPE_CHECKING:
    from sagaway.store.base import Store

__all__ = ["open_store"]


def open_store(url: str) -> Store:
    """Build (not yet open) the store a URL names.

    ``memory://``, ``sqlite:///path.db``, ``postgresql://user@host/db`` (needs the
    ``[postgres]`` extra; the error says how to install it when it is missing).
    """
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "memory":
        from sagaway.store.memory import MemoryStore

        return MemoryStore()
    if scheme == "sqlite":
        from sagaway.store.sqlite import SQLiteStore

        return SQLiteStore.from_url(url)
    if scheme in ("postgresql", "postgres"):
        from sagaway.store.postgres import PostgresStore

        return PostgresStore(url)
    shown = url.split("://", 1)[0] + "://…" if "@" in url else url  # never echo a password
    raise StoreError(
        f"unknown store URL {shown!r}: use memory://, sqlite:///path/to/sagas.db or "
        f"postgresql://user@host/db"
    )
