"""The multi-process PostgreSQL tests run `sagaway worker --app worker_app:orchestrator`.

Configured by environment variables (the tests set them):

* ``SAGAWAY_STORE_URL`` — the saga log; ``LEDGER_URL`` — a PostgreSQL URL whose
  ``?schema=`` holds the participant's ledger tables.
* ``LEASE_SECONDS``, ``POLL_INTERVAL``, ``MAX_RUNS`` — orchestrator settings.
* ``SLOW_STEP`` / ``STEP_DELAY`` — the step that sleeps (before applying its effect) and
  for how long, so a test can freeze or kill a worker while that step is in flight.

The participant is idempotent the way sagaway asks participants to be: every invocation is
recorded in ``invocations``; the effect is applied once per idempotency key (``effects``
primary key), in the same transaction.
"""

from __future__ import annotations

import asyncio
import os
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from sagaway import NonRetryableError, Orchestrator, RetryPolicy, Saga, StepContext

LEDGER_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS invocations (
    id BIGSERIAL PRIMARY KEY, idem_key TEXT NOT NULL, run_id TEXT NOT NULL, step TEXT NOT NULL,
    kind TEXT NOT NULL, attempt INTEGER NOT NULL, worker INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS effects (
    idem_key TEXT PRIMARY KEY, run_id TEXT NOT NULL, step TEXT NOT NULL, kind TEXT NOT NULL,
    seq BIGSERIAL
);
"""


def split_schema(url: str) -> tuple[str, str | None]:
    parts = urlsplit(url)
    query = parse_qsl(parts.query)
    schema = next((v for k, v in query if k == "schema"), None)
    rest = urlencode([(k, v) for k, v in query if k != "schema"])
    return urlunsplit(parts._replace(query=rest)), schema


_pool: asyncpg.Pool | None = None
_lock = asyncio.Lock()


async def ledger() -> asyncpg.Pool:
    global _pool
    async with _lock:
        if _pool is None:
            dsn, schema = split_schema(os.environ["LEDGER_URL"])
            _pool = await asyncpg.create_pool(
                dsn, min_size=1, max_size=8,
                server_settings={"search_path": schema} if schema else None,
            )
    return _pool


async def apply(ctx: StepContext, kind: str) -> None:
    if ctx.step == os.environ.get("SLOW_STEP"):
        await asyncio.sleep(float(os.environ.get("STEP_DELAY", "0")))
    pool = await ledger()
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO invocations (idem_key, run_id, step, kind, attempt, worker)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            ctx.idempotency_key, ctx.run_id, ctx.step, kind, ctx.attempt, os.getpid(),
        )
        if kind == "compensation":
            # Nothing to undo when the action never took effect (it may have been cut by a
            # crash before applying): a compensation must tolerate that.
            applied = await conn.fetchval(
                "SELECT 1 FROM effects WHERE idem_key = $1",
                f"{ctx.run_id}:{ctx.step}:action",
            )
            if not applied:
                return
        await conn.execute(
            "INSERT INTO effects (idem_key, run_id, step, kind) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (idem_key) DO NOTHING",
            ctx.idempotency_key, ctx.run_id, ctx.step, kind,
        )


transfer = Saga("transfer", version=1)


@transfer.step(retry=RetryPolicy(max_attempts=5, initial_backoff=0.05))
async def debit(ctx: StepContext, data: dict[str, object]) -> dict[str, str]:
    await apply(ctx, "action")
    return {"debit": ctx.idempotency_key}


@debit.compensation
async def refund(ctx: StepContext, data: dict[str, object], result: object) -> None:
    await apply(ctx, "compensation")


@transfer.step(retry=RetryPolicy(max_attempts=5, initial_backoff=0.05))
async def credit(ctx: StepContext, data: dict[str, object]) -> dict[str, str]:
    await apply(ctx, "action")
    return {"credit": ctx.idempotency_key}


@credit.compensation
async def reverse_credit(ctx: StepContext, data: dict[str, object], result: object) -> None:
    await apply(ctx, "compensation")


@transfer.step(retry=RetryPolicy(max_attempts=5, initial_backoff=0.05))
async def confirm(ctx: StepContext, data: dict[str, object]) -> None:
    if data.get("fail_at") == "confirm":
        raise NonRetryableError("the receiving bank refused the transfer")
    await apply(ctx, "action")


@confirm.compensation
async def unconfirm(ctx: StepContext, data: dict[str, object], result: object) -> None:
    await apply(ctx, "compensation")


orchestrator = Orchestrator(
    os.environ.get("SAGAWAY_STORE_URL", "sqlite:///sagas.db"),
    sagas=[transfer],
    lease_seconds=float(os.environ.get("LEASE_SECONDS", "2")),
    poll_interval=float(os.environ.get("POLL_INTERVAL", "0.1")),
    max_runs=int(os.environ.get("MAX_RUNS", "100000")),
)
