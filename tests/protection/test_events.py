"""Domain events a saga emits carry sealed payloads; consumers open them with
``open_message`` and the same keys; a sealed payload moved to another message does not
open."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest
from protection_helpers import codec

from sagaway import Orchestrator, PayloadCodecError, Saga, SagaStatus
from sagaway.messaging import Delivery, Envelope
from sagaway.messaging.memory import MemoryTransport
from sagaway.protection import open_message


async def test_events_are_sealed_and_open_with_the_keys(tmp_path: Path) -> None:
    s = Saga("order")

    @s.step(retriable=True)
    async def place(ctx: Any, data: Any) -> dict[str, Any]:
        return {"placed_for": data["card"]}

    s.emits(destination="order-events", completed="OrderPlaced")
    transport = MemoryTransport()
    got: asyncio.Queue[Envelope] = asyncio.Queue()

    async def consume(delivery: Delivery) -> None:
        await got.put(delivery.envelope)

    async with Orchestrator(f"sqlite:///{tmp_path}/e.db", sagas=[s], transport=transport,
                            codec=codec(), poll_interval=0.05) as orch:
        await transport.subscribe("order-events", consume)
        run = await (await orch.start("order", {"card": "4111"})).wait(timeout=20)
        assert run.status is SagaStatus.COMPLETED
        async with asyncio.timeout(10):
            event = await got.get()
    assert event.type == "OrderPlaced" and str(event.payload).startswith("sgw1:k1:")
    assert "4111" not in str(event.to_json())
    opened = open_message(codec(), event)
    assert opened.payload["input"] == {"card": "4111"}
    assert opened.payload["results"] == {"place": {"placed_for": "4111"}}
    moved = dataclasses.replace(Envelope(type="OrderPlaced"), payload=event.payload)
    with pytest.raises(PayloadCodecError):
        open_message(codec(), moved)
