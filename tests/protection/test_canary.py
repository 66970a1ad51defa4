"""The canary test: with the codec on, a value carried in saga inputs, results and error
texts never appears in plaintext in the SQLite file (and its WAL), in any PostgreSQL table,
in the participant's own database, or in a message body the broker delivered (real
RabbitMQ); with the codec off the same scans find it, which proves they look in the right
places."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from protection_helpers import codec, delete_queues, file_hits, fresh, postgres_hits, spy_on

from sagaway import NonRetryableError, Orchestrator, Saga, SagaStatus
from sagaway.messaging.rabbitmq import RabbitMQTransport
from sagaway.participant import Command, Participant


def canary_saga(service: str) -> Saga:
    saga = Saga("canary")

    @saga.step
    async def hold(ctx: Any, data: Any) -> dict[str, Any]:
        return {"held": data["card"]}

    @hold.compensation
    async def unhold(ctx: Any, data: Any, result: Any) -> None:
        return None

    saga.command_step("reserve", service=service, command="reserve", compensation="release",
                      timeout=20)

    @saga.step(pivot=True)
    async def charge(ctx: Any, data: Any) -> dict[str, Any]:
        if data.get("fail"):
            raise NonRetryableError(f"card {data['card']} was declined")
        return {"charged": data["card"], "echo": ctx.results["reserve"]}

    return saga


def participant(service: str, transport: RabbitMQTransport, db: str, on: bool) -> Participant:
    p = Participant(service, transport, db=db, codec=codec() if on else False)

    @p.handler("reserve")
    async def reserve(cmd: Command) -> dict[str, Any]:
        return {"reserved_for": cmd.payload["card"]}

    @p.handler("release")
    async def release(cmd: Command) -> dict[str, Any]:
        return {"released": cmd.payload["card"]}

    return p


@pytest.mark.parametrize("on", [True, False], ids=["codec-on", "codec-off"])
async def test_no_plaintext_canary_at_rest_or_on_the_wire(
        store_url: str, on: bool, tmp_path: Path, amqp_url: str) -> None:
    canary = f"CANARY{uuid.uuid4().hex}"
    needle = canary.encode()
    backend = "sqlite" if store_url.startswith("sqlite") else "postgres"
    service = fresh("canary.inventory")
    replies = fresh("canary.replies")
    seen: list[bytes] = []
    ours, theirs = RabbitMQTransport(amqp_url), RabbitMQTransport(amqp_url)
    spy_on(ours, seen)
    spy_on(theirs, seen)
    svc = participant(service, theirs, f"sqlite:///{tmp_path}/svc/inventory.db", on)
    try:
        async with svc, Orchestrator(store_url, sagas=[canary_saga(service)], transport=ours,
                                     reply_to=replies, codec=codec() if on else False,
                                     poll_interval=0.2) as orch:
            handles = [await orch.start("canary", {"card": canary, "n": i}) for i in range(3)]
            key = uuid.uuid4().hex
            handles.append(await orch.start("canary", {"card": canary, "fail": True},
                                            key=key))
            finals = [await h.wait(timeout=60) for h in handles]
            assert [r.status for r in finals] == [SagaStatus.COMPLETED] * 3 + [
                SagaStatus.COMPENSATED]
            # Through the API the data reads back whole.
            run = await orch.get(handles[0].id)
            assert run.input == {"card": canary, "n": 0}
            assert run.results["reserve"] == {"reserved_for": canary}
            assert run.results["charge"] == {"charged": canary,
                                             "echo": {"reserved_for": canary}}
            failed = await orch.get(handles[3].id)
            assert canary in (failed.error or "")
            assert any(canary in str((h.data or {}).get("error")) for h in failed.history)
            # The same key and input again finds the run (keyed fingerprints compare).
            again = await orch.start("canary", {"card": canary, "fail": True},
                                     key=key)
            assert again.id == handles[3].id and not again.created
            store_hits = (file_hits(tmp_path / "log", needle) if backend == "sqlite"
                          else await postgres_hits(store_url, canary))
        if backend == "sqlite":  # and after the close (WAL checkpointed into the file)
            closed = file_hits(tmp_path / "log", needle)
            store_hits = {f"{k} (closed)": v for k, v in closed.items()} | store_hits
        service_hits = file_hits(tmp_path / "svc", needle)
    finally:
        await delete_queues(amqp_url, set(ours.declared) | set(theirs.declared))
    wire_hits = sum(body.count(needle) for body in seen)
    assert len(seen) >= 4 * 2, "the spy saw too few deliveries to prove anything"
    if on:
        assert sum(store_hits.values()) == 0, store_hits
        assert wire_hits == 0
        assert sum(service_hits.values()) == 0, service_hits
    else:
        assert sum(store_hits.values()) > 0, store_hits
        assert wire_hits > 0
        assert sum(service_hits.values()) > 0, service_hits
