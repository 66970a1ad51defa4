"""A reply that finds its run held by another worker must wait for it, not die.

Found by the duplicate-delivery test: once in a few runs a reply is dead-lettered with
"handler failed on attempt 5 of 5: TransportError: run … is held by …; redeliver". The
orchestrator's reply handler gives the message back when it cannot claim the run, and every
give-back spends one of the subscription's ``max_deliveries`` (5): after ~0.3 s of
contention a perfectly good reply is dead-lettered, and the step waits for its deadline
(then retries, "possibly applied"). Here another worker holds the run, deterministically,
for 1.5 s while the reply arrives (memory:// only: the runtime decides this, not the
transport).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from msg_e2e_shop import (
    Behaviour,
    Names,
    bounded,
    build_participants,
    dead_letters,
    order_input,
    order_saga,
    running,
    start_orders,
    transport_factory,
    wait_all,
)

from sagaway import Orchestrator, RetryPolicy, SagaStatus

pytestmark = pytest.mark.e2e



@bounded(60)
async def test_a_reply_waits_while_another_worker_holds_its_run(names: Names,
                                                                tmp_path: Path) -> None:
    make = transport_factory("memory://")
    behaviour = Behaviour()
    behaviour.reserve_delay = lambda cmd: 0.5  # the run is parked meanwhile
    participants = build_participants(names, tmp_path, make, behaviour=behaviour)
    saga = order_saga(names, timeout=4.0, retry=RetryPolicy(max_attempts=3,
                                                            initial_backoff=0.05))
    async with running(participants), Orchestrator(
            f"sqlite:///{tmp_path / 'sagas.db'}", sagas=[saga], transport=make(),
            reply_to=names.replies, lease_seconds=2.0, poll_interval=0.1) as orch:
        ids = await start_orders(orch, {"order-0": order_input(1)})
        run_id = ids["order-0"]
        await asyncio.sleep(0.2)
        # Another worker takes the run (what claim_due or a reply does on a worker sharing
        # this store) and keeps it for 1.5 s, across the moment the reply arrives.
        held = await orch.store.claim_run(run_id, owner="worker-b", lease_seconds=1.5)
        assert held is not None, "the run should be parked (unowned) while reserve runs"
        assert not await wait_all(orch, [run_id], 20)
        run = await orch.get(run_id)
    dead = await dead_letters(make, f"{names.replies}.dead-letter", timeout=0.3)
    assert run.status is SagaStatus.COMPLETED
    deadline_passed = [h for h in run.history
                       if h.kind == "step.failed" and "no reply within" in str(h.data)]
    reasons = [d.dead_letter.reason if d.dead_letter else d.raw for d in dead]
    assert not dead and not deadline_passed, (
        f"the reply was dead-lettered ({reasons}) and the step waited for its deadline "
        f"({[(h.step, h.attempt, h.data) for h in deadline_passed]})")
