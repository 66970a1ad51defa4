"""Shared pieces of the data-protection tests."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sagaway.messaging.base import Delivery, Transport
from sagaway.protection import AesGcmCodec

KEY1 = os.urandom(32)
KEY2 = os.urandom(32)


def codec(active: str = "k1", **keys: bytes) -> AesGcmCodec:
    return AesGcmCodec(keys or {"k1": KEY1}, active=active)


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def eventually(check: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result is None or result:
                return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.05)


def spy_on(transport: Transport, seen: list[bytes]) -> None:
    """Record the raw bytes of every message the broker delivers to this transport's
    consumers, before the handler runs (and so before the ack)."""
    original = transport.subscribe

    async def subscribe(source: str, handler: Callable[[Delivery], Awaitable[object]],
                        **kwargs: Any) -> Any:
        async def recording(delivery: Delivery) -> object:
            seen.append(delivery.raw)
            return await handler(delivery)

        return await original(source, recording, **kwargs)

    transport.subscribe = subscribe  # type: ignore[method-assign]


def file_hits(folder: Path, needle: bytes, pattern: str = "*") -> dict[str, int]:
    """How many times ``needle`` occurs in each file matching ``pattern`` in ``folder``."""
    out = {}
    for path in sorted(folder.glob(pattern)):
        if path.is_file():
            out[path.name] = path.read_bytes().count(needle)
    return out


async def postgres_hits(url: str, needle: str) -> dict[str, int]:
    """Rows of every table in the URL's schema whose text form contains ``needle``."""
    import asyncpg

    base, _, query = url.partition("?")
    schema = dict(p.split("=", 1) for p in query.split("&") if p)["schema"]
    conn = await asyncpg.connect(base)
    try:
        tables = [r[0] for r in await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1",
            schema)]
        assert tables, f"no tables in schema {schema}"
        hits = {}
        for table in tables:
            hits[table] = await conn.fetchval(
                f'SELECT count(*) FROM "{schema}"."{table}" AS t '
                f"WHERE strpos(t::text, $1) > 0", needle)
        return hits
    finally:
        await conn.close()


async def delete_queues(url: str, names: set[str]) -> None:
    import aio_pika

    if not names:
        return
    connection = await aio_pika.connect(url, timeout=10)
    try:
        channel = await connection.channel()
        for name in sorted(names):
            await channel.queue_delete(name)
    finally:
        await connection.close()
