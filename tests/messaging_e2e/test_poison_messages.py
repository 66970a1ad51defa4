"""Poison commands and malformed envelopes go to the dead-letter destination; the rest flows.

* A poison order: inventory's ``reserve`` handler always raises for it. After
  ``max_deliveries`` (3) deliveries each attempt's command is dead-lettered with the
  handler's error; the step's deadline passes, it is retried (dead-lettered again), gives
  up, and the order compensates. Ten ordinary orders sent at the same time all finish.
* Bytes that are not JSON and a JSON object that is not an envelope, published raw to the
  service's queue, are dead-lettered at once with the reason; a well-formed command of a
  type the service does not handle is dead-lettered as rejected.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from msg_e2e_shop import (
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
)

from sagaway import Orchestrator, RetryPolicy, SagaStatus
from sagaway.messaging import Envelope
from sagaway.messaging.envelope import DeadLetter

pytestmark = pytest.mark.e2e

MAX_DELIVERIES = 3
ORDERS = 10


@bounded(60)
async def test_poison_and_malformed_messages_are_dead_lettered(broker_url: str, names: Names,
                                                               tmp_path: Path) -> None:
    began = time.monotonic()
    make = transport_factory(broker_url)
    participants = build_participants(names, tmp_path, make, max_deliveries=MAX_DELIVERIES)
    saga = order_saga(names, timeout=1.5, retry=RetryPolicy(max_attempts=2,
                                                            initial_backoff=0.05))
    store = f"sqlite:///{tmp_path / 'sagas.db'}"
    inputs = {f"order-{i}": order_input(i) for i in range(ORDERS)}
    poison = order_input(ORDERS, decline_every=0, poison=True)
    unknown = Envelope(type="teleport", payload={}, idempotency_key="k:teleport:action",
                       reply_to=names.replies, correlation_id="k:teleport:action:1")
    async with running(participants), Orchestrator(
            store, sagas=[saga], transport=make(), reply_to=names.replies,
            lease_seconds=2.0, poll_interval=0.1) as orch:
        raw = make()
        async with raw:
            await raw.publish_raw(names.inventory, b"{not json at all", message_id="bad-1")
            await raw.publish_raw(names.inventory, b'{"id": "no-type", "payload": 1}',
                                  message_id="bad-2")
            await raw.publish(names.inventory, unknown)
        ids = await start_orders(orch, {"poison": poison})
        ids.update(await start_orders(orch, inputs))
        stuck = await wait_all(orch, ids.values(), 30)
    runs = await read_runs(store)
    # Two attempts of the poison command, the two malformed messages, the unknown type.
    got = await dead_letters(make, f"{names.inventory}.dead-letter", expect=5, timeout=10)

    figure = Figure(f"poison + malformed on {transport_name(broker_url)}")
    verify(figure, runs, {**inputs, "poison": poison}, ids, tmp_path,
           expect=lambda data: ({SagaStatus.COMPENSATED} if data.get("poison")
                                else {SagaStatus.COMPENSATED if data["decline"]
                                      else SagaStatus.COMPLETED}))
    if stuck:
        figure.problems.append(f"{len(stuck)} runs unfinished")
    letters = [d.dead_letter for d in got]
    assert all(isinstance(x, DeadLetter) for x in letters), got
    dead = [x for x in letters if x is not None]
    assert all(x.source == names.inventory for x in dead), dead
    by_reason = sorted(x.reason for x in dead)
    poison_key = f"{ids['poison']}:reserve:action"
    poisoned = [x for x in dead if poison_key.encode() in x.body]
    if len(poisoned) != 2 or any(
            x.attempts != MAX_DELIVERIES
            or f"handler failed on attempt {MAX_DELIVERIES} of {MAX_DELIVERIES}" not in x.reason
            or "RuntimeError: poison order" not in x.reason for x in poisoned):
        figure.problems.append(f"poison command: dead letters {poisoned}")
    for needle, body in (("not JSON", b"{not json at all"),
                         ("the required field 'type' is missing", b'{"id": "no-type"')):
        found = [x for x in dead if needle in x.reason]
        if len(found) != 1 or not found[0].body.startswith(body):
            figure.problems.append(f"malformed {body!r}: no dead letter saying {needle!r} "
                                   f"in {by_reason}")
    rejected = [x for x in dead if "unknown command type 'teleport'" in x.reason]
    if len(rejected) != 1:
        figure.problems.append(f"unknown command type: no dead letter in {by_reason}")
    else:
        figure.notes.append(f"unknown type dead-lettered after {rejected[0].attempts} "
                            f"deliveries")
    if len(dead) != 5:
        figure.problems.append(f"{len(dead)} dead letters, expected 5: {by_reason}")
    figure.notes.append(f"{len(dead)} dead letters")
    figure.seconds = time.monotonic() - began
    assert figure.ok, figure.report()
    figure.report()
