"""The examples' services write the same SQL against SQLite or PostgreSQL.

:class:`Sql` wraps the connection sagaway hands a handler (``req.db`` in an idempotent
endpoint, ``cmd.db`` in a participant's command handler) and takes PostgreSQL-style ``$1``
placeholders on both; everything else is SQL both databases accept.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from sagaway.participant.fastapi import Idempotency
from sagaway.participant.sqlite import AsyncSQLiteConnection

__all__ = ["Sql", "service_app", "sqlite_path"]

_PLACEHOLDER = re.compile(r"\$(\d+)")


class Sql:
    """``$1``-style SQL on an asyncpg connection or an :class:`AsyncSQLiteConnection`."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.sqlite = isinstance(conn, AsyncSQLiteConnection)

    def _sql(self, sql: str) -> str:
        return _PLACEHOLDER.sub(r"?\1", sql) if self.sqlite else sql

    async def execute(self, sql: str, *args: Any) -> int:
        """Run one statement; return the number of rows it changed."""
        if self.sqlite:
            return int(await self.conn.execute(self._sql(sql), args))
        status: str = await self.conn.execute(sql, *args)
        last = status.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0

    async def fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        if self.sqlite:
            return [tuple(r) for r in await self.conn.fetchall(self._sql(sql), args)]
        return [tuple(r) for r in await self.conn.fetch(sql, *args)]

    async def fetchrow(self, sql: str, *args: Any) -> tuple[Any, ...] | None:
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = await self.fetchrow(sql, *args)
        return None if row is None else row[0]

    async def script(self, *statements: str) -> None:
        """Run DDL statements one by one (setup)."""
        for statement in statements:
            await self.execute(statement)


def sqlite_path(db_url: str) -> str | None:
    """The file of a ``sqlite:///`` URL (``None`` for another database)."""
    if not db_url.startswith("sqlite:///"):
        return None
    return db_url.removeprefix("sqlite:///").split("?", 1)[0]


def service_app(
    title: str,
    db_url: str,
    setup: Callable[[Sql], Awaitable[None]],
) -> tuple[FastAPI, Idempotency]:
    """A service's FastAPI app over its own database: the database is opened (sagaway's
    tables created) and ``setup`` runs (business tables, seed data) at startup; ``GET
    /healthz`` answers once it is ready."""
    idem = Idempotency(db_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await idem.open()
        try:
            async with idem.connection() as conn:
                await setup(Sql(conn))
            yield
        finally:
            await idem.aclose()

    app = FastAPI(title=title, lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": title}

    return app, idem
