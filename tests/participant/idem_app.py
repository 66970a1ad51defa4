"""A FastAPI service with idempotent endpoints, for tests/participant/test_fastapi_idempotency.

``applied`` gets one row per *run of a handler* (no unique key on purpose: a request applied
twice shows as two rows); ``stock`` is the business state the handlers change.

Run as a process: ``IDEM_DB=sqlite:///x.db uvicorn --factory idem_app:from_env``.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Header, HTTPException
from pydantic import BaseModel

from sagaway.participant.fastapi import Idempotency, IdempotentRequest
from sagaway.participant.sqlite import AsyncSQLiteConnection

SKU = "BOOK-42"
STOCK = 100


class Take(BaseModel):
    sku: str = SKU
    qty: int = 1
    delay: float = 0.0
    """Seconds the handler sleeps after its write, inside the transaction (widens races)."""


async def execute(db: Any, sql: str, *args: Any) -> None:
    """One statement with ``$1`` placeholders, on either database."""
    if isinstance(db, AsyncSQLiteConnection):
        await db.execute(re.sub(r"\$(\d+)", r"?\1", sql), args)
    else:
        await db.execute(sql, *args)


async def fetch(db: Any, sql: str) -> list[tuple[Any, ...]]:
    if isinstance(db, AsyncSQLiteConnection):
        return [tuple(r) for r in await db.fetchall(sql)]
    return [tuple(r) for r in await db.fetch(sql)]


def create_app(db_url: str) -> FastAPI:
    idem = Idempotency(db_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await idem.open()
        async with idem.connection() as db:
            await execute(
                db, "CREATE TABLE IF NOT EXISTS stock (sku TEXT PRIMARY KEY, qty INTEGER NOT NULL)"
            )
            await execute(
                db, "CREATE TABLE IF NOT EXISTS applied (key TEXT NOT NULL, what TEXT NOT NULL)"
            )
            await execute(
                db, "INSERT INTO stock VALUES ($1, $2) ON CONFLICT DO NOTHING", SKU, STOCK
            )
        yield
        await idem.aclose()

    app = FastAPI(lifespan=lifespan)
    app.state.idem = idem

    @app.post("/take", status_code=201)
    @idem.endpoint
    async def take(
        body: Take, req: IdempotentRequest, x_stall: float = Header(default=0.0)
    ) -> dict[str, Any]:
        await execute(req.db, "UPDATE stock SET qty = qty - $1 WHERE sku = $2", body.qty, body.sku)
        await execute(req.db, "INSERT INTO applied VALUES ($1, 'take')", req.key)
        if body.delay or x_stall:
            # Headers are not part of the request's fingerprint: a retry without X-Stall
            # is the same request.
            await asyncio.sleep(body.delay or x_stall)
        rows = await fetch(req.db, f"SELECT qty FROM stock WHERE sku = '{body.sku}'")
        return {"left": rows[0][0], "key": req.key}

    @app.post("/refuse")
    @idem.endpoint
    async def refuse(body: Take, req: IdempotentRequest) -> dict[str, Any]:
        # Writes, then says no: the write is undone, the "no" recorded.
        await execute(req.db, "UPDATE stock SET qty = qty - $1 WHERE sku = $2", body.qty, body.sku)
        await execute(req.db, "INSERT INTO applied VALUES ($1, 'refuse')", req.key)
        raise HTTPException(409, f"not enough {body.sku}")

    @app.post("/flaky")
    @idem.endpoint
    async def flaky(body: Take, req: IdempotentRequest) -> dict[str, Any]:
        # Writes, then crashes until stock is low enough: nothing is recorded.
        await execute(req.db, "UPDATE stock SET qty = qty - $1 WHERE sku = $2", body.qty, body.sku)
        await execute(req.db, "INSERT INTO applied VALUES ($1, 'flaky')", req.key)
        if app.state.fail:
            app.state.fail -= 1
            raise RuntimeError("the disk is on fire")
        return {"ok": True}

    app.state.fail = 0

    @app.delete("/take/{name}")
    @idem.endpoint
    async def untake(name: str, req: IdempotentRequest) -> dict[str, Any]:
        await execute(req.db, "INSERT INTO applied VALUES ($1, $2)", req.key, f"delete {name}")
        return {"deleted": name}

    @app.get("/state")
    async def state() -> dict[str, Any]:
        async with idem.connection() as db:
            stock = await fetch(db, f"SELECT qty FROM stock WHERE sku = '{SKU}'")
            applied = await fetch(db, "SELECT key, what FROM applied ORDER BY key, what")
        return {"stock": stock[0][0], "applied": [list(r) for r in applied]}

    return app


def from_env() -> FastAPI:
    return create_app(os.environ["IDEM_DB"])
