"""Optional comparison: the same 3-step saga as a DBOS workflow on the same PostgreSQL.

Runs only when ``dbos`` is importable in the benchmark's interpreter (it is not a project
dependency). The workflow is ``async``: three ``@DBOS.step()`` calls (reserve, charge,
ship), each step's output checkpointed by DBOS; on the compensation path ``ship`` raises and
the workflow runs ``refund`` and ``unreserve`` as steps, so both sides do the same work.
A workflow is called directly (``await order(n)``), DBOS's fastest way to run one and wait
for its result; its system tables go in a fresh schema (``dbos_system_schema``), dropped
afterwards. DBOS's settings are its defaults except the log level.

DBOS keeps process-global state, so each configuration runs in its own child process.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from typing import Any

from benchlib import closed_loop, peak_rss_mb

INSTALL_HINT = "DBOS not installed: pip install dbos to compare"


class OutOfStock(Exception):
    """The business "no" of ``ship`` (module level: DBOS pickles a step's exception)."""


def available() -> bool:
    return importlib.util.find_spec("dbos") is not None


def dbos_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("dbos")
    except Exception:
        return None


async def run_dbos(url: str, schema: str, path: str, concurrency: int, seconds: float,
                   warmup: float) -> dict[str, Any]:
    from dbos import DBOS, DBOSConfig

    @DBOS.step()
    async def reserve(n: int) -> dict[str, int]:
        return {"reserved": 1}

    @DBOS.step()
    async def charge(n: int) -> dict[str, int]:
        return {"charged": 1}

    @DBOS.step()
    async def ship(n: int, fail: bool) -> dict[str, int]:
        if fail:
            raise OutOfStock("out of stock")
        return {"shipped": 1}

    @DBOS.step()
    async def refund(n: int) -> None:
        return None

    @DBOS.step()
    async def unreserve(n: int) -> None:
        return None

    @DBOS.workflow()
    async def order(n: int, fail: bool) -> str:
        await reserve(n)
        await charge(n)
        try:
            await ship(n, fail)
        except OutOfStock:
            await refund(n)
            await unreserve(n)
            return "compensated"
        return "completed"

    fail = path == "compensation"
    expected = "compensated" if fail else "completed"

    async def one(w: int, i: int) -> str | None:
        outcome = await order(w * 10_000_000 + i, fail)
        return None if outcome == expected else f"workflow ended {outcome!r}, expected {expected}"

    config: DBOSConfig = {
        "name": "sagaway-bench",
        "system_database_url": url,
        "dbos_system_schema": schema,
        "log_level": "WARNING",
    }
    logging.getLogger("dbos").setLevel(logging.WARNING)
    DBOS(config=config)
    DBOS.launch()
    try:
        if warmup > 0:
            await closed_loop(one, concurrency, warmup)
        latencies, errors, elapsed = await closed_loop(one, concurrency, seconds)
    finally:
        await asyncio.to_thread(DBOS.destroy)
    return {
        "latencies": [round(x, 6) for x in latencies],
        "errors": errors,
        "elapsed": elapsed,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
