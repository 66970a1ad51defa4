"""A participant process SIGKILLed between committing a command and publishing its reply.

The process (participant_app.py) kills itself at the moment its relay would publish: the
business change, the inbox record and the reply are committed, nothing is on the wire.
Restarted, it publishes the reply; the change stays applied once. Then SIGTERM stops it
gracefully. On SQLite and PostgreSQL, over RabbitMQ (a memory broker does not outlive a
process).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from participant_helpers import STOCK, Orchestra, Shop, fresh

from sagaway.messaging.rabbitmq import RabbitMQTransport

pytestmark = pytest.mark.e2e

APP = Path(__file__).with_name("participant_app.py")
TIMEOUT = 30.0


@pytest.fixture
async def rabbit_orchestra(amqp_url: str) -> AsyncIterator[Orchestra]:
    side = Orchestra(RabbitMQTransport(amqp_url), fresh("inventory"))
    await side.start()
    yield side
    transport = side.transport
    await transport.aclose()
    # The participant processes declared the same queues, plus nothing else.
    import aio_pika

    assert isinstance(transport, RabbitMQTransport)
    connection = await aio_pika.connect(amqp_url, timeout=10)
    try:
        channel = await connection.channel()
        for name in sorted(transport.declared | {side.service}):
            await channel.queue_delete(name)
    finally:
        await connection.close()


async def start(
    shop: Shop, orchestra: Orchestra, amqp_url: str, *flags: str
) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(APP),
        "--db",
        shop.db_url,
        "--broker",
        amqp_url,
        "--service",
        orchestra.service,
        *flags,
        stdout=asyncio.subprocess.PIPE,
        cwd=APP.parent,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)
    assert line.strip() == b"ready", line
    return proc


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
async def test_a_reply_lost_to_sigkill_is_published_on_restart(
    shop: Shop, rabbit_orchestra: Orchestra, amqp_url: str, sync: bool
) -> None:
    orchestra = rabbit_orchestra
    flags = ("--sync",) if sync else ()
    command = orchestra.command(payload={"qty": 2})

    doomed = await start(shop, orchestra, amqp_url, "--die-on-reply", *flags)
    try:
        await orchestra.send(command)
        assert await asyncio.wait_for(doomed.wait(), TIMEOUT) == -signal.SIGKILL
    finally:
        if doomed.returncode is None:
            doomed.kill()
            await doomed.wait()
    assert await shop.ledger() == [command.idempotency_key]
    assert await shop.outbox() == [False]
    assert orchestra.replies == []

    restarted = await start(shop, orchestra, amqp_url, *flags)
    try:
        replies = await orchestra.wait_replies(1)
        await asyncio.sleep(0.3)
        restarted.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(restarted.wait(), TIMEOUT) == 0
    finally:
        if restarted.returncode is None:
            restarted.kill()
            await restarted.wait()
    # Two replies if the command was redelivered too (killed before its ack): the same.
    assert 1 <= len(replies) <= 2
    for reply in replies:
        assert reply.payload == {"ok": True, "result": {"sku": "BOOK-42", "left": STOCK - 2}}
        assert reply.correlation_id == command.id
    assert await shop.ledger() == [command.idempotency_key]
    assert await shop.stock() == STOCK - 2
    assert set(await shop.outbox()) == {True}
