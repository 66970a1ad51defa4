"""A lost key: a run whose data was encrypted with a key this worker does not have fails
with a clear error in its state and history; the worker goes on with other runs; once the
key is back the data reads again and an operator can compensate the run."""

from __future__ import annotations

import asyncio
from typing import Any

from protection_helpers import KEY1, KEY2, eventually

from sagaway import Orchestrator, Saga, SagaStatus
from sagaway.protection import AesGcmCodec

K1 = AesGcmCodec({"k1": KEY1})
K2_ONLY = AesGcmCodec({"k2": KEY2})
BOTH = AesGcmCodec({"k1": KEY1, "k2": KEY2}, active="k2")


def saga(gate: asyncio.Event, undone: list[Any]) -> Saga:
    s = Saga("order")

    @s.step
    async def reserve(ctx: Any, data: Any) -> dict[str, Any]:
        return {"reserved": data["sku"]}

    @reserve.compensation
    async def release(ctx: Any, data: Any, result: Any) -> None:
        undone.append((data, result))

    @s.step
    async def hold(ctx: Any, data: Any) -> str:
        await gate.wait()
        return "held"

    @hold.compensation
    async def unhold(ctx: Any, data: Any, result: Any) -> None:
        undone.append(("unhold", data))

    @s.step(pivot=True)
    async def charge(ctx: Any, data: Any) -> str:
        return "charged"

    return s


async def test_a_run_under_a_missing_key_fails_clearly_and_others_go_on(
        store_url: str) -> None:
    never, undone = asyncio.Event(), []
    async with Orchestrator(store_url, sagas=[saga(never, undone)], codec=K1,
                            poll_interval=0.05) as orch:
        handle = await orch.start("order", {"sku": "A-1"})

        async def charging() -> bool:
            run = await orch.get(handle.id)
            return any(h.kind == "step.started" and h.step == "hold" for h in run.history)

        await eventually(charging)
    # Closing released the lease: the run is RUNNING and unowned, its data under k1.
    open_gate = asyncio.Event()
    open_gate.set()
    async with Orchestrator(store_url, sagas=[saga(open_gate, undone)], codec=K2_ONLY,
                            poll_interval=0.05) as orch:
        other = await orch.start("order", {"sku": "B-2"})
        assert (await other.wait(timeout=20)).status is SagaStatus.COMPLETED

        async def failed() -> bool:
            return (await orch.get(handle.id)).status is SagaStatus.FAILED

        await eventually(failed, timeout=20)
        run = await orch.get(handle.id)
        assert "payload encrypted with key 'k1' which is not configured" in (run.error or "")
        assert run.history[-1].kind == "run.finished"
        assert run.history[-1].data is not None
        assert run.history[-1].data["cause"] == "payload_unreadable"
        assert [h.kind for h in run.history[-2:]] == ["step.interrupted", "run.finished"]
        assert str(run.input).startswith("sgw1:k1:")  # still sealed, untouched
        # The worker is still serving.
        third = await orch.start("order", {"sku": "C-3"})
        assert (await third.wait(timeout=20)).status is SagaStatus.COMPLETED
    async with Orchestrator(store_url, sagas=[saga(open_gate, undone)], codec=BOTH,
                            poll_interval=0.05) as orch:
        run = await orch.get(handle.id)
        assert run.input == {"sku": "A-1"} and run.results["reserve"] == {"reserved": "A-1"}
        await orch.compensate(handle.id, reason="key restored", actor="ops")
        final = await orch.wait(handle.id, timeout=20)
        assert final.status is SagaStatus.COMPENSATED
        assert ({"sku": "A-1"}, {"reserved": "A-1"}) in undone
        assert ("unhold", {"sku": "A-1"}) in undone
