"""The inventory service: stock per item; a reservation takes stock, its release gives it back.

Run: ``INVENTORY_DB=sqlite:///inventory.db uvicorn --factory examples.ecommerce.inventory:from_env``

Every write endpoint is idempotent by ``Idempotency-Key`` (sagaway.participant.fastapi): the
reservation and the record of its key commit together in this service's own database.

A reservation is keyed by its order: a release that arrives before its reservation (the
reservation timed out on the orchestrator's side and is still on the wire) leaves a
``released`` row behind, so the late reservation is refused instead of taking stock that
nothing would ever give back.
"""

from __future__ import annotations

import json
import os
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from examples.servicedb import Sql, service_app
from sagaway.participant.fastapi import IdempotentRequest

DEFAULT_STOCK = {"BOOK": 1000, "LAMP": 1000, "MUG": 1000}


class ReserveIn(BaseModel):
    order_id: str = Field(min_length=1, max_length=200)
    sku: str
    qty: int = Field(gt=0)


class Reservation(BaseModel):
    reservation_id: str
    sku: str
    qty: int


def create_app(db_url: str, *, stock: dict[str, int] | None = None) -> FastAPI:
    """The service over ``db_url``; ``stock`` seeds items that are not in the database yet."""
    seed = DEFAULT_STOCK if stock is None else stock

    async def setup(db: Sql) -> None:
        await db.script(
            "CREATE TABLE IF NOT EXISTS stock (sku TEXT PRIMARY KEY, "
            "qty INTEGER NOT NULL CHECK (qty >= 0))",
            "CREATE TABLE IF NOT EXISTS reservations (order_id TEXT PRIMARY KEY, "
            "sku TEXT NOT NULL, qty INTEGER NOT NULL, status TEXT NOT NULL)",
        )
        for sku, qty in seed.items():
            await db.execute(
                "INSERT INTO stock (sku, qty) VALUES ($1, $2) ON CONFLICT DO NOTHING", sku, qty
            )

    app, idem = service_app("inventory", db_url, setup)

    @app.post("/reservations", status_code=201)
    @idem.endpoint
    async def reserve(body: ReserveIn, req: IdempotentRequest) -> Reservation:
        db = Sql(req.db)
        status = await db.fetchval(
            "SELECT status FROM reservations WHERE order_id = $1", body.order_id
        )
        if status == "released":
            raise HTTPException(422, f"order {body.order_id} was cancelled before this arrived")
        if status is None:
            taken = await db.execute(
                "UPDATE stock SET qty = qty - $1 WHERE sku = $2 AND qty >= $1", body.qty, body.sku
            )
            if not taken:
                left = await db.fetchval("SELECT qty FROM stock WHERE sku = $1", body.sku)
                if left is None:
                    raise HTTPException(422, f"unknown item {body.sku!r}")
                raise HTTPException(
                    422, f"out of stock: {body.qty} x {body.sku} asked, {left} left"
                )
            await db.execute(
                "INSERT INTO reservations VALUES ($1, $2, $3, 'reserved')",
                body.order_id,
                body.sku,
                body.qty,
            )
        return Reservation(reservation_id=body.order_id, sku=body.sku, qty=body.qty)

    @app.delete("/reservations/{order_id}")
    @idem.endpoint
    async def release(order_id: str, req: IdempotentRequest) -> Any:
        db = Sql(req.db)
        row = await db.fetchrow(
            "SELECT sku, qty, status FROM reservations WHERE order_id = $1", order_id
        )
        if row is None:
            # Fence: a reservation arriving after this release is refused.
            await db.execute("INSERT INTO reservations VALUES ($1, '', 0, 'released')", order_id)
            return JSONResponse(
                {"detail": f"no reservation for order {order_id}: nothing to release"}, 404
            )
        sku, qty, status = row
        if status == "reserved":
            await db.execute("UPDATE stock SET qty = qty + $1 WHERE sku = $2", qty, sku)
            await db.execute(
                "UPDATE reservations SET status = 'released' WHERE order_id = $1", order_id
            )
        return {"order_id": order_id, "released": qty if status == "reserved" else 0}

    @app.get("/stock")
    async def get_stock() -> dict[str, int]:
        async with idem.connection() as conn:
            rows = await Sql(conn).fetch("SELECT sku, qty FROM stock ORDER BY sku")
        return {sku: qty for sku, qty in rows}

    @app.get("/reservations")
    async def reserved() -> dict[str, Any]:
        """Stock held by reservations, per item, and the orders holding it."""
        async with idem.connection() as conn:
            rows = await Sql(conn).fetch(
                "SELECT order_id, sku, qty FROM reservations WHERE status = 'reserved' "
                "ORDER BY order_id"
            )
        held: dict[str, int] = {}
        for _, sku, qty in rows:
            held[sku] = held.get(sku, 0) + qty
        return {"held": held, "orders": [r[0] for r in rows]}

    return app


def from_env() -> FastAPI:
    """``INVENTORY_DB`` (default ``sqlite:///inventory.db``), ``INVENTORY_STOCK`` (JSON)."""
    stock = os.environ.get("INVENTORY_STOCK")
    return create_app(
        os.environ.get("INVENTORY_DB", "sqlite:///inventory.db"),
        stock=json.loads(stock) if stock else None,
    )
