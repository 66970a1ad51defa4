"""A participant applies each command once and answers it, on every database and broker.

Each test runs on SQLite and PostgreSQL, over the memory transport and RabbitMQ, and (where
the handler matters) with sync and async handlers. The orchestrator's side is a stand-in
that publishes command envelopes and collects replies and dead letters.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

from participant_helpers import STOCK, Orchestra, Shop, StuckTransport

from sagaway.messaging.base import Transport
from sagaway.participant import REPLY_TYPE, Command, Participant
from sagaway.testing.transport_conformance import eventually

MAX_DELIVERIES = 3


def participant(
    shop: Shop,
    orchestra: Orchestra,
    transport: Transport,
    *,
    sync: bool = False,
    **options: Any,
) -> Participant:
    p = Participant(
        orchestra.service, transport, shop.db_url, max_deliveries=MAX_DELIVERIES, **options
    )
    shop.register(p, sync=sync)
    return p


async def test_a_command_is_applied_once_and_answered(
    shop: Shop, orchestra: Orchestra, transports: Callable[[], Transport], sync: bool
) -> None:
    command = orchestra.command(payload={"qty": 3})
    async with participant(shop, orchestra, transports(), sync=sync):
        await orchestra.send(command)
        [reply] = await orchestra.wait_replies(1)
        assert reply.type == REPLY_TYPE
        assert reply.payload == {"ok": True, "result": {"sku": "BOOK-42", "left": STOCK - 3}}
        assert (reply.run_id, reply.step, reply.idempotency_key, reply.correlation_id) == (
            command.run_id,
            command.step,
            command.idempotency_key,
            command.correlation_id,
        )
        assert await shop.stock() == STOCK - 3
        assert await shop.ledger() == [command.idempotency_key]
        assert await shop.inbox() == [command.idempotency_key]
    assert await shop.outbox() == [True]


async def test_a_command_delivered_twice_is_applied_once_and_answered_twice(
    shop: Shop, orchestra: Orchestra, transports: Callable[[], Transport], sync: bool
) -> None:
    command = orchestra.command(payload={"qty": 2})
    # A redelivery (the same message) and a re-send (a new message, same idempotency key).
    resent = dataclasses.replace(command, id="resend-1", correlation_id="resend-1")
    async with participant(shop, orchestra, transports(), sync=sync):
        for envelope in (command, command, resent):
            await orchestra.send(envelope)
        replies = await orchestra.wait_replies(3)
        await asyncio.sleep(0.2)  # nothing more comes
    assert len(replies) == 3
    assert [r.payload for r in replies] == [
        {"ok": True, "result": {"sku": "BOOK-42", "left": STOCK - 2}}
    ] * 3
    assert sorted(r.correlation_id or "" for r in replies) == sorted(
        [command.id, command.id, "resend-1"]
    )
    assert {(r.type, r.run_id, r.step, r.idempotency_key) for r in replies} == {
        (REPLY_TYPE, command.run_id, command.step, command.idempotency_key)
    }
    assert shop.calls[command.idempotency_key] == 1
    assert await shop.stock() == STOCK - 2
    assert await shop.ledger() == [command.idempotency_key]


async def test_a_business_no_is_a_failure_reply_and_its_changes_are_rolled_back(
    shop: Shop, orchestra: Orchestra, transports: Callable[[], Transport], sync: bool
) -> None:
    command = orchestra.command(payload={"qty": STOCK + 1})
    async with participant(shop, orchestra, transports(), sync=sync):
        await orchestra.send(command)
        [reply] = await orchestra.wait_replies(1)
        assert reply.payload == {
            "ok": False,
            "error": "NonRetryableError: out of stock: BOOK-42",
            "retryable": False,
        }
        assert reply.correlation_id == command.id
        # The handler wrote before refusing: nothing of it stays, but the answer is recorded.
        assert await shop.stock() == STOCK
        assert await shop.ledger() == []
        assert await shop.inbox() == [command.idempotency_key]
        await orchestra.send(dataclasses.replace(command, id="again"))
        replies = await orchestra.wait_replies(2)
    assert replies[1].payload == reply.payload
    assert shop.calls[command.idempotency_key] == 1


async def test_a_handler_that_raises_is_redelivered_then_dead_lettered(
    shop: Shop, orchestra: Orchestra, transports: Callable[[], Transport], sync: bool
) -> None:
    shop.fail_until = 1_000
    poison = orchestra.command("flaky")
    after = orchestra.command("reserve", payload={"qty": 1})
    async with participant(shop, orchestra, transports(), sync=sync):
        await orchestra.send(poison)
        await orchestra.send(after)
        [dead] = await orchestra.wait_dead(1)
        [reply] = await orchestra.wait_replies(1)
    assert dead.envelope().id == poison.id
    assert dead.attempts == MAX_DELIVERIES
    assert "RuntimeError: flaky failure on attempt 3" in dead.reason
    assert shop.calls[poison.idempotency_key] == MAX_DELIVERIES
    # The queue kept flowing: the next command was answered; the poison left no trace.
    assert reply.idempotency_key == after.idempotency_key and reply.payload["ok"] is True
    assert await shop.ledger() == [after.idempotency_key]
    assert poison.idempotency_key not in await shop.inbox()


async def test_a_handler_that_fails_then_succeeds_is_applied_once(
    shop: Shop, orchestra: Orchestra, transports: Callable[[], Transport], sync: bool
) -> None:
    shop.fail_until = MAX_DELIVERIES - 1
    command = orchestra.command("flaky")
    async with participant(shop, orchestra, transports(), sync=sync):
        await orchestra.send(command)
        [reply] = await orchestra.wait_replies(1)
        await asyncio.sleep(0.2)
    assert reply.payload == {"ok": True, "result": {"sku": "BOOK-42", "left": STOCK - 3}}
    assert shop.calls[command.idempotency_key] == MAX_DELIVERIES
    assert await shop.ledger() == [command.idempotency_key]
    assert orchestra.dead == [] and len(orchestra.replies) == 1


async def test_commands_it_cannot_take_are_dead_lettered_with_the_reason(
    shop: Shop, orchestra: Orchestra, transports: Callable[[], Transport]
) -> None:
    unknown = orchestra.command("teleport")
    no_reply_to = orchestra.command(reply_to=None)
    no_key = orchestra.command(idempotency_key=None)
    async with participant(shop, orchestra, transports()):
        for envelope in (unknown, no_reply_to, no_key):
            await orchestra.send(envelope)
        dead = await orchestra.wait_dead(3)
        good = orchestra.command(payload={"qty": 1})
        await orchestra.send(good)
        [reply] = await orchestra.wait_replies(1)
    reasons = {d.envelope().id: d.reason for d in dead}
    assert (
        "unknown command type 'teleport' for service "
        f"'{orchestra.service}' (it handles ['flaky', 'reserve'])"
    ) in reasons[unknown.id]
    assert "CommandRejected" in reasons[unknown.id]
    assert "has no reply_to" in reasons[no_reply_to.id]
    assert "has no idempotency_key" in reasons[no_key.id]
    assert reply.idempotency_key == good.idempotency_key
    assert await shop.ledger() == [good.idempotency_key]


async def test_a_reply_committed_but_never_published_goes_out_after_a_restart(
    shop: Shop, orchestra: Orchestra, transports: Callable[[], Transport]
) -> None:
    command = orchestra.command(payload={"qty": 4})
    stuck = StuckTransport(transports(), stuck=orchestra.replies_to)
    first = participant(shop, orchestra, stuck, grace=0.2)
    async with first:
        await orchestra.send(command)
        # Committed, the relay is inside its publish, the command is acked: then it dies.
        await eventually(lambda: stuck.attempts >= 1, what="the relay to publish")
        assert await shop.ledger() == [command.idempotency_key]
    assert orchestra.replies == []
    assert await shop.outbox() == [False]

    async with participant(shop, orchestra, transports()):
        [reply] = await orchestra.wait_replies(1)
        await asyncio.sleep(0.2)
    assert reply.payload == {"ok": True, "result": {"sku": "BOOK-42", "left": STOCK - 4}}
    assert reply.correlation_id == command.id
    assert len(orchestra.replies) == 1
    assert await shop.outbox() == [True]
    assert await shop.ledger() == [command.idempotency_key]
    assert shop.calls[command.idempotency_key] == 1


async def test_a_result_that_is_not_json_is_a_failure_reply_and_rolled_back(
    shop: Shop, orchestra: Orchestra, transports: Callable[[], Transport]
) -> None:
    p = participant(shop, orchestra, transports())

    @p.handler("weird")
    async def weird(cmd: Command) -> object:
        await shop_write(shop, cmd)
        return object()

    command = orchestra.command("weird")
    async with p:
        await orchestra.send(command)
        [reply] = await orchestra.wait_replies(1)
    assert reply.payload["ok"] is False
    assert "the result of 'weird' cannot be sent as JSON" in reply.payload["error"]
    assert await shop.ledger() == []


async def shop_write(shop: Shop, cmd: Command) -> None:
    if shop.kind == "sqlite":
        await cmd.db.execute("INSERT INTO ledger VALUES (?, 1)", (cmd.idempotency_key,))
    else:
        await cmd.db.execute("INSERT INTO ledger VALUES ($1, 1)", cmd.idempotency_key)


async def test_concurrent_copies_of_a_command_apply_it_once(
    shop: Shop, orchestra: Orchestra, transports: Callable[[], Transport]
) -> None:
    copies = 5
    command = orchestra.command(payload={"qty": 1})
    p = participant(shop, orchestra, transports(), prefetch=copies)
    async with p:
        for i in range(copies):
            await orchestra.send(dataclasses.replace(command, id=f"copy-{i}"))
        replies = await orchestra.wait_replies(copies)
    assert {str(r.payload) for r in replies} == {
        str({"ok": True, "result": {"sku": "BOOK-42", "left": STOCK - 1}})
    }
    assert await shop.ledger() == [command.idempotency_key]
    assert shop.calls[command.idempotency_key] == 1
