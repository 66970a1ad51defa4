"""Small helpers the integration tests share (imported by name; pytest puts this folder on
sys.path because it has no ``__init__.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from sagaway import SagaRun


def timeline(run: SagaRun) -> list[tuple[str, str | None, int | None]]:
    """The run's history as (kind, step, attempt), oldest first."""
    return [(h.kind, h.step, h.attempt) for h in run.history]


def kinds(run: SagaRun) -> list[str]:
    return [h.kind for h in run.history]


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout: float = 5.0,
                     interval: float = 0.01) -> None:
    """Poll ``check`` until it is true; fail the test after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110 - the condition lives in user code
            await asyncio.sleep(interval)
