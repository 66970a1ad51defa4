"""The payment service: customer balances; a charge takes money, its refund gives it back.

Run: ``PAYMENT_DB=sqlite:///payment.db uvicorn --factory examples.ecommerce.payment:from_env``

Amounts are integer cents. A charge the balance cannot cover, or a card whose number fails
the Luhn check, is a business refusal (402: the saga compensates, it does not retry). Like
inventory, a refund that arrives before its charge leaves a ``refunded`` row behind and the
late charge is refused.

The charge takes the customer's ``card``. This service is careless on purpose, as real ones
are: its refusals quote the card number. The order saga declares ``card.number`` and
``card.cvc`` sensitive, so sagaway keeps them out of its errors, logs, spans and views
(``tests/examples/test_ecommerce_sensitive.py``). The service's ``payments`` rows keep only
the last four digits; its idempotency inbox keeps a hash of each request and the response
it sent, so the refusals that quote a card number sit there too (this service's data, which
sagaway does not mask).
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


class Card(BaseModel):
    number: str = Field(pattern=r"^[0-9]{12,19}$")
    cvc: str = Field(pattern=r"^[0-9]{3,4}$")


class ChargeIn(BaseModel):
    order_id: str = Field(min_length=1, max_length=200)
    customer: str
    amount: int = Field(gt=0)
    card: Card


class Payment(BaseModel):
    payment_id: str
    customer: str
    amount: int
    card_last4: str


def luhn_ok(number: str) -> bool:
    """The Luhn checksum every card number carries (catches a mistyped digit)."""
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def create_app(db_url: str, *, balances: dict[str, int] | None = None) -> FastAPI:
    seed = DEFAULT_BALANCES if balances is None else balances

    async def setup(db: Sql) -> None:
        await db.script(
            "CREATE TABLE IF NOT EXISTS accounts (customer TEXT PRIMARY KEY, "
            "balance INTEGER NOT NULL CHECK (balance >= 0))",
            "CREATE TABLE IF NOT EXISTS payments (order_id TEXT PRIMARY KEY, "
            "customer TEXT NOT NULL, amount INTEGER NOT NULL, status TEXT NOT NULL, "
            "card_last4 TEXT NOT NULL DEFAULT '')",
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
        card = body.card.number
        if status is None:
            if not luhn_ok(card):
                raise HTTPException(402, f"card {card} declined: not a valid card number")
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
                    402,
                    f"card {card} declined: insufficient funds: {body.amount} asked, "
                    f"{balance} available",
                )
            await db.execute(
                "INSERT INTO payments VALUES ($1, $2, $3, 'charged', $4)",
                body.order_id,
                body.customer,
                body.amount,
                card[-4:],
            )
        return Payment(
            payment_id=body.order_id,
            customer=body.customer,
            amount=body.amount,
            card_last4=card[-4:],
        )

    @app.delete("/payments/{order_id}")
    @idem.endpoint
    async def refund(order_id: str, req: IdempotentRequest) -> Any:
        db = Sql(req.db)
        row = await db.fetchrow(
            "SELECT customer, amount, status FROM payments WHERE order_id = $1", order_id
        )
        if row is None:
            await db.execute("INSERT INTO payments VALUES ($1, '', 0, 'refunded', '')", order_id)
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
