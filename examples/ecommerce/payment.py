"""The payment service: customer balances; a charge takes money, its refund gives it back.

Run: ``PAYMENT_DB=sqlite:///payment.db uvicorn --factory examples.ecommerce.payment:from_env``

Amounts are integer cents. A charge the balance cannot cover is a business refusal
(402: the saga compensates, it does not retry). Like inventory, a refund that arrives before
its charge leaves a ``refunded`` row behind and the late charge is refused.
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

DEFAULT_BALANCES = {"alice": 10_000_000, "bob": 10_000_000, "broke": 0}


class ChargeIn(BaseModel):
    order_id: str = Field(min_length=1, max_length=200)
    customer: str
    amount: int = Field(gt=0)


class Payment(BaseModel):
    payment_id: str
    customer: str
    amount: int


def create_app(db_url: str, *, balances: dict[str, int] | None = None) -> FastAPI:
    seed = DEFAULT_BALANCES if balances is None else balances

    async def setup(db: Sql) -> None:
        await db.script(
            "CREATE TABLE IF NOT EXISTS accounts (customer TEXT PRIMARY KEY, "
            "balance INTEGER NOT NULL CHECK (balance >= 0))",
            "CREATE TABLE IF NOT EXISTS payments (order_id TEXT PRIMARY KEY, "
            "customer TEXT NOT NULL, amount INTEGER NOT NULL, status TEXT NOT NULL)",
        )
        for customer, balance in seed.items():
            await db.execute(
                "INSERT INTO accounts VALUES ($1, $2) ON CONFLICT DO NOTHING", customer, balance
            )

    app, idem = service_app("payment", db_url, setup)

    @app.post("/payments", status_code=201)
    @idem.endpoint
    async def charge(body: ChargeIn, req: IdempotentRequest) -> Payment:
        db = Sql(req.db)
        status = await db.fetchval("SELECT status FROM payments WHERE order_id = $1", body.order_id)
        if status == "refunded":
            raise HTTPException(422, f"order {body.order_id} was refunded before this arrived")
        if status is None:
            taken = await db.execute(
                "UPDATE accounts SET balance = balance - $1 WHERE customer = $2 AND balance >= $1",
                body.amount,
                body.customer,
            )
            if not taken:
                balance = await db.fetchval(
                    "SELECT balance FROM accounts WHERE customer = $1", body.customer
                )
                if balance is None:
                    raise HTTPException(422, f"unknown customer {body.customer!r}")
                raise HTTPException(
                    402, f"insufficient funds: {body.amount} asked, {balance} available"
                )
            await db.execute(
                "INSERT INTO payments VALUES ($1, $2, $3, 'charged')",
                body.order_id,
                body.customer,
                body.amount,
            )
        return Payment(payment_id=body.order_id, customer=body.customer, amount=body.amount)

    @app.delete("/payments/{order_id}")
    @idem.endpoint
    async def refund(order_id: str, req: IdempotentRequest) -> Any:
        db = Sql(req.db)
        row = await db.fetchrow(
            "SELECT customer, amount, status FROM payments WHERE order_id = $1", order_id
        )
        if row is None:
            await db.execute("INSERT INTO payments VALUES ($1, '', 0, 'refunded')", order_id)
            return JSONResponse(
                {"detail": f"no payment for order {order_id}: nothing to refund"}, 404
            )
        customer, amount, status = row
        if status == "charged":
            await db.execute(
                "UPDATE accounts SET balance = balance + $1 WHERE customer = $2", amount, customer
            )
            await db.execute(
                "UPDATE payments SET status = 'refunded' WHERE order_id = $1", order_id
            )
        return {"order_id": order_id, "refunded": amount if status == "charged" else 0}

    @app.get("/accounts")
    async def accounts() -> dict[str, int]:
        async with idem.connection() as conn:
            rows = await Sql(conn).fetch("SELECT customer, balance FROM accounts ORDER BY 1")
        return {c: b for c, b in rows}

    @app.get("/payments")
    async def charged() -> dict[str, Any]:
        """Money taken by charges not refunded, and the orders it was taken for."""
        async with idem.connection() as conn:
            rows = await Sql(conn).fetch(
                "SELECT order_id, amount FROM payments WHERE status = 'charged' ORDER BY 1"
            )
        return {"charged": sum(r[1] for r in rows), "orders": [r[0] for r in rows]}

    return app


def from_env() -> FastAPI:
    """``PAYMENT_DB`` (default ``sqlite:///payment.db``), ``PAYMENT_BALANCES`` (JSON)."""
    balances = os.environ.get("PAYMENT_BALANCES")
    return create_app(
        os.environ.get("PAYMENT_DB", "sqlite:///payment.db"),
        balances=json.loads(balances) if balances else None,
    )
