"""What the observability tests share: a shop saga, real servers, Prometheus text parsing
(imported by name; pytest puts this folder on sys.path)."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI

from sagaway import NonRetryableError, RetryPolicy, Saga, StepContext

FAST = RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.01)
ONCE = RetryPolicy(max_attempts=1)
CANARY = "4929123456789012"
"""A card number that must never leave the saga log."""
AUTH_CANARY = "auth-7f3a9c51e2"
"""An authorisation code the charge step returns (a sensitive result)."""

log = logging.getLogger("shop.steps")


def shop_saga(*, sensitive: list[str] | None = None, name: str = "shop") -> Saga:
    """reserve → charge → ship. ``charge`` logs the card and, on ``{"decline": true}``,
    declines with an error that repeats it; ``reserve``'s compensation fails on
    ``{"release_broken": true}``; ``ship`` fails once on ``{"flaky": true}``."""
    saga = Saga(name, sensitive=sensitive or [])

    @saga.step(retry=FAST)
    async def reserve(ctx: StepContext, data: dict[str, Any]) -> dict[str, str]:
        log.info("reserving %s", data.get("sku"))
        return {"reservation": "r-1"}

    @reserve.compensation(retry=ONCE)
    async def release(ctx: StepContext, data: dict[str, Any], result: Any) -> None:
        if data.get("release_broken"):
            raise RuntimeError(f"inventory down while releasing for card {data['card']['number']}")

    @saga.step(retry=FAST)
    def charge(ctx: StepContext, data: dict[str, Any]) -> dict[str, str]:
        # A sync step on a thread: its log records must still know their run.
        log.info("charging card %s", data["card"]["number"])
        if data.get("decline"):
            raise NonRetryableError(f"card {data['card']['number']} declined by the bank")
        return {"charge": "ch-1", "auth_code": AUTH_CANARY}

    @charge.compensation
    async def refund(ctx: StepContext, data: dict[str, Any], result: Any) -> None:
        log.info("refunding card %s", data["card"]["number"])

    @saga.step(retry=FAST, read_only=True)
    async def ship(ctx: StepContext, data: dict[str, Any]) -> str:
        if data.get("flaky") and ctx.attempt == 1:
            raise RuntimeError("carrier timeout")
        if data.get("fail_ship"):
            raise NonRetryableError(f"no carrier for card holder {data['card']['number']}")
        return "shipped"

    return saga


def order(**extra: Any) -> dict[str, Any]:
    return {"sku": "sku-1", "qty": 1, "card": {"number": CANARY, "holder": "A. Buyer"},
            **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@asynccontextmanager
async def uvicorn_server(app: FastAPI) -> AsyncIterator[str]:
    """A real uvicorn server on 127.0.0.1 (an OS-picked port) in this event loop."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, ws="none", lifespan="on", log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:
                assert not task.done(), "uvicorn exited at startup"
                await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample in Prometheus text exposition."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        labels = dict(_LABEL.findall(m.group("labels") or ""))
        out.append((m.group("name"), labels, float(m.group("value"))))
    return out


def value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels``."""
    found = [v for n, lab, v in samples(text)
             if n == name and all(lab.get(k) == want for k, want in labels.items())]
    assert found, f"no sample {name}{labels} in:\n{text}"
    return sum(found)
