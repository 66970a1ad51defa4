"""A bank: accounts in its own database, commands from its RabbitMQ queue.

Run (one process per bank)::

    BANK_NAME=a BANK_DB=sqlite:///bank-a.db BANK_QUEUE=bank-a \
    SAGAWAY_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/ \
    uvicorn --factory examples.bank_transfer.bank:from_env --port 8021

Commands (each applied once: sagaway's inbox records the key with the change):

* ``debit`` ``{from_account, amount}``: takes the money, or refuses (insufficient funds,
  closed or unknown account) with :class:`~sagaway.NonRetryableError`;
* ``reverse_debit``: gives a debit back (the participant fences the debit if this arrives
  first, so a late debit is never applied);
* ``credit`` ``{to_account, amount}``: adds the money, or refuses if the account is closed.

HTTP: ``GET /accounts`` (balances), ``GET /healthz``.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from examples.servicedb import Sql
from sagaway import NonRetryableError
from sagaway.participant import Command, Participant

__all__ = ["ACCOUNTS", "CLOSED", "create_app", "from_env", "participant"]

ACCOUNTS = {
    "a": {"A-1": 1_000_000, "A-2": 1_000_000, "A-POOR": 100},
    "b": {"B-1": 0, "B-2": 0, "B-CLOSED": 0},
}
"""Balances (cents) each bank starts with."""
CLOSED = {"a": set[str](), "b": {"B-CLOSED"}}


def participant(
    queue: str,
    amqp_url: str,
    db_url: str,
    *,
    accounts: dict[str, int],
    closed: set[str],
) -> Participant:
    """The bank's command handlers over its database, taking commands from ``queue``."""
    bank = Participant(queue, amqp_url, db=db_url)

    async def account(db: Sql, account_id: str) -> None:
        """Refuse (for good) an account that is unknown or closed."""
        row = await db.fetchrow("SELECT is_open FROM accounts WHERE id = $1", account_id)
        if row is None:
            raise NonRetryableError(f"no account {account_id!r} at {queue}")
        if not row[0]:
            raise NonRetryableError(f"account {account_id} is closed")

    @bank.handler("debit")
    async def debit(cmd: Command) -> dict[str, Any]:
        db, p = Sql(cmd.db), cmd.payload
        await account(db, p["from_account"])
        taken = await db.execute(
            "UPDATE accounts SET balance = balance - $1 WHERE id = $2 AND balance >= $1",
            p["amount"], p["from_account"],
        )  # fmt: skip
        if not taken:
            raise NonRetryableError(f"insufficient funds in {p['from_account']}")
        await db.execute(
            "INSERT INTO entries VALUES ($1, 'debit', $2, $3, 'applied')",
            cmd.run_id, p["from_account"], p["amount"],
        )  # fmt: skip
        return {"debited": p["amount"], "account": p["from_account"]}

    @bank.handler("reverse_debit")
    async def reverse_debit(cmd: Command) -> dict[str, Any]:
        db = Sql(cmd.db)
        row = await db.fetchrow(
            "SELECT account, amount, status FROM entries WHERE transfer_id = $1 AND kind = 'debit'",
            cmd.run_id,
        )
        if row is None or row[2] != "applied":
            return {"reversed": 0}
        await db.execute("UPDATE accounts SET balance = balance + $1 WHERE id = $2", row[1], row[0])
        await db.execute(
            "UPDATE entries SET status = 'reversed' WHERE transfer_id = $1 AND kind = 'debit'",
            cmd.run_id,
        )
        return {"reversed": row[1], "account": row[0]}

    @bank.handler("credit")
    async def credit(cmd: Command) -> dict[str, Any]:
        db, p = Sql(cmd.db), cmd.payload
        await account(db, p["to_account"])
        await db.execute(
            "UPDATE accounts SET balance = balance + $1 WHERE id = $2", p["amount"], p["to_account"]
        )
        await db.execute(
            "INSERT INTO entries VALUES ($1, 'credit', $2, $3, 'applied')",
            cmd.run_id, p["to_account"], p["amount"],
        )  # fmt: skip
        return {"credited": p["amount"], "account": p["to_account"]}

    return bank


async def _setup(db: Sql, accounts: dict[str, int], closed: set[str]) -> None:
    await db.script(
        "CREATE TABLE IF NOT EXISTS accounts (id TEXT PRIMARY KEY, "
        "balance BIGINT NOT NULL CHECK (balance >= 0), is_open BOOLEAN NOT NULL)",
        "CREATE TABLE IF NOT EXISTS entries (transfer_id TEXT NOT NULL, kind TEXT NOT NULL, "
        "account TEXT NOT NULL, amount BIGINT NOT NULL, status TEXT NOT NULL, "
        "PRIMARY KEY (transfer_id, kind))",
    )
    for account_id, balance in accounts.items():
        await db.execute(
            "INSERT INTO accounts VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            account_id, balance, account_id not in closed,
        )  # fmt: skip


def create_app(
    name: str,
    queue: str,
    amqp_url: str,
    db_url: str,
    *,
    accounts: dict[str, int] | None = None,
    closed: set[str] | None = None,
) -> FastAPI:
    """Bank ``name`` (``a`` or ``b`` for the defaults), its participant on ``queue``."""
    seed = ACCOUNTS.get(name, {}) if accounts is None else accounts
    shut = CLOSED.get(name, set()) if closed is None else closed
    bank = participant(queue, amqp_url, db_url, accounts=seed, closed=shut)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await bank.db.open()
        try:
            async with bank.db.transaction() as tx:
                await _setup(Sql(tx.connection), seed, shut)
            async with bank:  # takes commands until the app stops
                yield
        finally:
            await bank.db.aclose()

    app = FastAPI(title=f"bank {name}", lifespan=lifespan)

    @app.get("/accounts")
    async def balances() -> dict[str, int]:
        async with bank.db.transaction() as tx:
            rows = await Sql(tx.connection).fetch("SELECT id, balance FROM accounts ORDER BY id")
        return {account_id: int(balance) for account_id, balance in rows}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": f"bank {name}", "queue": queue}

    return app


def from_env() -> FastAPI:
    """``BANK_NAME`` (a, b), ``BANK_DB``, ``BANK_QUEUE`` (default ``bank-<name>``),
    ``SAGAWAY_AMQP_URL``, ``BANK_ACCOUNTS`` (JSON balances), ``BANK_CLOSED`` (ids, comma
    separated)."""
    name = os.environ.get("BANK_NAME", "a")
    accounts = os.environ.get("BANK_ACCOUNTS")
    closed = os.environ.get("BANK_CLOSED")
    return create_app(
        name,
        os.environ.get("BANK_QUEUE", f"bank-{name}"),
        os.environ.get("SAGAWAY_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
        os.environ.get("BANK_DB", f"sqlite:///bank-{name}.db"),
        accounts=json.loads(accounts) if accounts else None,
        closed=set(filter(None, closed.split(","))) if closed is not None else None,
    )
