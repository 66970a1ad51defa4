"""The broker stopped and started again while sagas are in flight.

RabbitMQ: ``rabbitmqctl stop_app`` / ``start_app`` (quorum queues keep their messages).
NATS: the server SIGKILLed and started again (file-backed streams keep theirs). Redis: a
``shutdown nosave`` and a fresh server: it keeps **nothing** here, so every command, reply
and compensation sitting in a stream is gone, and only the step deadline and retry (the
command re-sent with the same idempotency key; the participant's inbox answers a repeat with
the recorded reply) bring those sagas home. Steps get a 2 s deadline and many retries.

Every saga must end as its input says (COMPLETED, or COMPENSATED for a declined card), the
orchestrator's outbox must drain, and no effect may be applied twice or go missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from messaging_helpers import nats_down, rabbitmq_down, redis_down
from msg_e2e_shop import (
    Behaviour,
    Figure,
    Names,
    bounded,
    build_participants,
    count_known_bug,
    declines_may_fail,
    drain_outbox,
    order_input,
    order_saga,
    read_runs,
    running,
    start_orders,
    transport_factory,
    transport_name,
    verify,
    wait_all,
    with_timeout,
)

from sagaway import Orchestrator, RetryPolicy
from sagaway.run import ACTIVE_STATUSES

pytestmark = pytest.mark.e2e

SAGAS = 40
WORK = 0.03
DEADLINE = 3.0
WAIT = 90.0
DOWN: dict[str, Callable[[], contextlib.AbstractAsyncContextManager[None]]] = {
    "rabbitmq": rabbitmq_down, "nats": nats_down, "redis": redis_down,
}


async def redis_entries(url: str, names: Names) -> int:
    """Entries (queued or delivered, not yet acked) in this test's Redis streams."""
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=3)
    try:
        return sum([await client.xlen(f"sagaway:{n}") for n in names.all()])
    finally:
        await client.aclose()


@bounded(150)
async def test_broker_restarted_while_sagas_are_in_flight(real_broker_url: str, names: Names,
                                                          tmp_path: Path) -> None:
    began = time.monotonic()
    broker = transport_name(real_broker_url)
    make = transport_factory(real_broker_url)
    behaviour = Behaviour()
    behaviour.work = WORK  # with a small prefetch, commands queue up in the broker
    participants = build_participants(names, tmp_path, make, behaviour=behaviour, prefetch=2)
    retry = RetryPolicy(max_attempts=40, initial_backoff=0.2, max_backoff=1.0)
    saga = order_saga(names, timeout=DEADLINE, retry=retry)
    store = f"sqlite:///{tmp_path / 'sagas.db'}"
    inputs = {f"order-{i}": order_input(i) for i in range(SAGAS)}
    restart: Callable[[], contextlib.AbstractAsyncContextManager[None]] = DOWN[broker]
    async with running(participants), Orchestrator(
            store, sagas=[saga], transport=make(), reply_to=names.replies, lease_seconds=2.0,
            poll_interval=0.2) as orch:
        # Orders keep coming in (one every 25 ms) while the broker goes away.
        starting = asyncio.create_task(start_orders(orch, inputs, pace=0.025))
        await asyncio.sleep(0.5)
        counts = await orch.counts()
        in_flight = sum(counts[s] for s in ACTIVE_STATUSES)
        queued = await redis_entries(real_broker_url, names) if broker == "redis" else None
        down_at = time.monotonic()
        async with restart():
            await asyncio.sleep(1.0)
        outage = time.monotonic() - down_at
        acked = await with_timeout(starting, 60, "starting the sagas")
        stuck = await wait_all(orch, acked.values(), WAIT)
        backlog = await drain_outbox(orch, 30)
    runs = await read_runs(store)

    figure = Figure(f"broker restart on {broker}")
    # A declined order whose first charge reply was lost must still compensate.
    verify(figure, runs, inputs, acked, tmp_path, expect=declines_may_fail)
    count_known_bug(figure, runs)
    figure.seconds = time.monotonic() - began
    timeouts = sum(1 for r in runs for h in r.history
                   if h.kind in ("step.failed", "compensation.failed")
                   and "no reply within" in str(h.data))
    figure.notes.append(f"{in_flight} in flight at the stop, outage {outage:.1f}s, "
                        f"{timeouts} step deadlines passed and retried")
    if queued is not None:
        figure.notes.append(f"{queued} entries in the Redis streams at the shutdown, all lost")
    if stuck:
        figure.problems.append(f"{len(stuck)} runs unfinished after {WAIT}s")
    if backlog != (0, None):
        figure.problems.append(f"the orchestrator's outbox did not drain: {backlog}")
    assert figure.ok, figure.report()
    figure.report()
