"""The shipping service: schedules a shipment per order, cancels it on compensation.

Run: ``SHIPPING_DB=sqlite:///shipping.db uvicorn --factory examples.ecommerce.shipping:from_env``

It delivers anywhere but to addresses in :data:`UNDELIVERABLE` (a business refusal, 422).
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from examples.servicedb import Sql, service_app
from sagaway.participant.fastapi import IdempotentRequest

UNDELIVERABLE = ("Atlantis",)


class ShipIn(BaseModel):
    order_id: str = Field(min_length=1, max_length=200)
    address: str = Field(min_length=1)


class Shipment(BaseModel):
    shipment_id: str
    address: str


def create_app(db_url: str) -> FastAPI:
    async def setup(db: Sql) -> None:
        await db.execute(
            "CREATE TABLE IF NOT EXISTS shipments (order_id TEXT PRIMARY KEY, "
            "address TEXT NOT NULL, status TEXT NOT NULL)"
        )

    app, idem = service_app("shipping", db_url, setup)

    @app.post("/shipments", status_code=201)
    @idem.endpoint
    async def schedule(body: ShipIn, req: IdempotentRequest) -> Shipment:
        db = Sql(req.db)
        status = await db.fetchval(
            "SELECT status FROM shipments WHERE order_id = $1", body.order_id
        )
        if status == "cancelled":
            raise HTTPException(422, f"order {body.order_id} was cancelled before this arrived")
        if body.address in UNDELIVERABLE:
            raise HTTPException(422, f"we do not deliver to {body.address}")
        if status is None:
            await db.execute(
                "INSERT INTO shipments VALUES ($1, $2, 'scheduled')", body.order_id, body.address
            )
        return Shipment(shipment_id=body.order_id, address=body.address)

    @app.delete("/shipments/{order_id}")
    @idem.endpoint
    async def cancel(order_id: str, req: IdempotentRequest) -> Any:
        db = Sql(req.db)
        status = await db.fetchval("SELECT status FROM shipments WHERE order_id = $1", order_id)
        if status is None:
            await db.execute("INSERT INTO shipments VALUES ($1, '', 'cancelled')", order_id)
            return JSONResponse(
                {"detail": f"no shipment for order {order_id}: nothing to cancel"}, 404
            )
        await db.execute("UPDATE shipments SET status = 'cancelled' WHERE order_id = $1", order_id)
        return {"order_id": order_id, "cancelled": status == "scheduled"}

    @app.get("/shipments")
    async def scheduled() -> dict[str, Any]:
        async with idem.connection() as conn:
            rows = await Sql(conn).fetch(
                "SELECT order_id FROM shipments WHERE status = 'scheduled' ORDER BY 1"
            )
        return {"orders": [r[0] for r in rows]}

    return app


def from_env() -> FastAPI:
    """``SHIPPING_DB`` (default ``sqlite:///shipping.db``)."""
    return create_app(os.environ.get("SHIPPING_DB", "sqlite:///shipping.db"))
