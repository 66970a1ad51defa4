"""Every message delivered twice: 200 orders, each effect applied once.

Every transport (the orchestrator's and each participant's) is wrapped in ``Duplicating``:
each command, each reply, each compensation is published twice. The participants' inboxes
must absorb the duplicate commands (one business row per idempotency key) and the
orchestrator must ignore the duplicate replies (every run ends as its input says).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from msg_e2e_shop import (
    Duplicating,
    Figure,
    Names,
    bounded,
    build_participants,
    dead_letters,
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

pytestmark = pytest.mark.e2e

SAGAS = 200
WAIT = 90.0


@bounded(150)
async def test_every_message_delivered_twice(broker_url: str, names: Names,
                                             tmp_path: Path) -> None:
    began = time.monotonic()
    make = transport_factory(broker_url)
    wrappers: list[Duplicating] = []

    def duplicating() -> Duplicating:
        wrappers.append(Duplicating(make()))
        return wrappers[-1]

    participants = build_participants(names, tmp_path, duplicating)
    # A generous deadline: no attempt should time out here, every duplicate is a real one.
    saga = order_saga(names, timeout=30.0, retry=RetryPolicy(max_attempts=3,
                                                             initial_backoff=0.05))
    store = f"sqlite:///{tmp_path / 'sagas.db'}"
    inputs = {f"order-{i}": order_input(i) for i in range(SAGAS)}
    async with running(participants), Orchestrator(
            store, sagas=[saga], transport=duplicating(), reply_to=names.replies,
            lease_seconds=5.0, poll_interval=0.2) as orch:
        acked = await with_timeout(start_orders(orch, inputs), 60, "starting the sagas")
        stuck = await wait_all(orch, acked.values(), WAIT)
        backlog = await orch.store.outbox_backlog()
    dead: list[str] = []
    for destination in [names.replies, *(p.service for p in participants)]:
        for d in await dead_letters(make, f"{destination}.dead-letter", timeout=0.5):
            letter = d.dead_letter
            dead.append(f"{destination}: {letter.reason if letter else d.raw[:200]!r}")
    runs = await read_runs(store)

    figure = Figure(f"duplicates x2 on {transport_name(broker_url)}")
    verify(figure, runs, inputs, acked, tmp_path)
    figure.seconds = time.monotonic() - began
    deliveries = sum(sum(w.received.values()) for w in wrappers)
    distinct = sum(len(w.received) for w in wrappers)
    ignored = sum(1 for r in runs for h in r.history if h.kind == "event.ignored")
    figure.notes.append(f"{deliveries} deliveries of {distinct} envelopes, "
                        f"{ignored} duplicate replies ignored, {len(dead)} dead-lettered")
    figure.notes += dead[:3]
    if stuck:
        figure.problems.append(f"{len(stuck)} runs unfinished after {WAIT}s")
    if backlog != (0, None):
        figure.problems.append(f"outbox backlog {backlog}")
    # Every message was really received twice (the dedup had something to do).
    if deliveries < 2 * distinct:
        figure.problems.append(f"only {deliveries} deliveries for {distinct} envelopes: the "
                               f"duplicates did not arrive")
    assert figure.ok, figure.report()
    figure.report()
