"""Replies (and effects) that arrive after the step's deadline.

The deadline makes the attempt "possibly applied": with no attempts left, the saga
compensates, and the compensation must undo whatever the late attempt did. The late reply is
then recorded and ignored; it never moves a finished run.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from msg_e2e_shop import (
    Behaviour,
    Figure,
    Names,
    Proxy,
    bounded,
    build_participants,
    db_path,
    order_input,
    order_saga,
    running,
    start_orders,
    transport_factory,
    transport_name,
    verify,
    wait_all,
)

from sagaway import Orchestrator, RetryPolicy, SagaStatus
from sagaway.messaging.base import Transport

pytestmark = pytest.mark.e2e

DEADLINE = 1.0
LATE = 2.5
ONE_ATTEMPT = RetryPolicy(max_attempts=1)
RETRY = RetryPolicy(max_attempts=5, initial_backoff=0.1, max_backoff=0.3)


class LateReplies(Proxy):
    """Replies matching ``late`` reach the broker ``LATE`` seconds after the participant
    committed them (a slow network), without holding up the other replies."""

    def __init__(self, inner: Transport, late: Callable[[dict[str, Any]], bool]) -> None:
        super().__init__(inner)
        self.late = late
        self.delayed: list[asyncio.Task[None]] = []
        self.delivered_late: list[float] = []

    async def _publish(self, destination: str, body: bytes, *, message_id: str | None) -> None:
        if not self.late(json.loads(body)):
            await super()._publish(destination, body, message_id=message_id)
            return

        async def later() -> None:
            await asyncio.sleep(LATE)
            await super(LateReplies, self)._publish(destination, body, message_id=message_id)
            self.delivered_late.append(time.monotonic())

        self.delayed.append(asyncio.create_task(later()))


def _is_reply(step: str, attempt: int) -> Callable[[dict[str, Any]], bool]:
    suffix = f":{step}:action:{attempt}"
    return lambda doc: (doc.get("type") == "sagaway.reply"
                        and str(doc.get("correlation_id", "")).endswith(suffix))


async def _one_order(url: str, names: Names, directory: Path, *, saga_retry: RetryPolicy,
                     behaviour: Behaviour | None = None,
                     late: Callable[[dict[str, Any]], bool] | None = None,
                     linger: float = 0.0,
                     data: dict[str, Any]) -> tuple[Any, LateReplies | None]:
    """Run one order to its end; return its final snapshot (after the late reply landed)."""
    make = transport_factory(url)
    wrappers: list[LateReplies] = []

    def transport() -> Transport:
        if late is None:
            return make()
        wrappers.append(LateReplies(make(), late))
        return wrappers[-1]

    participants = build_participants(names, directory, transport, behaviour=behaviour)
    saga = order_saga(names, timeout=DEADLINE, retry=saga_retry, compensation_retry=RETRY)
    store = f"sqlite:///{directory / 'sagas.db'}"
    async with running(participants), Orchestrator(
            store, sagas=[saga], transport=make(), reply_to=names.replies, lease_seconds=2.0,
            poll_interval=0.1) as orch:
        ids = await start_orders(orch, {"order-0": data})
        stuck = await wait_all(orch, ids.values(), 30)
        assert not stuck, f"the order did not finish: {await orch.get(ids['order-0'])}"
        delayed = [t for w in wrappers for t in w.delayed]
        if delayed:
            await asyncio.wait_for(asyncio.gather(*delayed), LATE + 10)
            await asyncio.sleep(0.5)  # the late reply is consumed and dismissed
        await asyncio.sleep(linger)
        final = await orch.get(ids["order-0"])
    return final, (wrappers[0] if wrappers else None)


def _reservations(directory: Path) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(db_path(directory, "inventory"))) as conn:
        return list(conn.execute("SELECT key, released FROM reservations"))


def _check(figure: Figure, run: Any, directory: Path, data: dict[str, Any],
           expect: SagaStatus) -> None:
    verify(figure, [run], {"order-0": data}, {"order-0": run.id}, directory,
           expect=lambda _: {expect})


@bounded(60)
async def test_a_reply_after_the_deadline_is_compensated(broker_url: str, names: Names,
                                                         tmp_path: Path) -> None:
    """reserve applies at once but its reply comes after the deadline: the attempt gave up
    as possibly applied, release undoes the reservation, the late reply is ignored."""
    began = time.monotonic()
    data = order_input(1, decline_every=0)
    run, wrapper = await _one_order(broker_url, names, tmp_path, saga_retry=ONE_ATTEMPT,
                                    late=_is_reply("reserve", 1), data=data)
    assert wrapper is not None and wrapper.delivered_late
    figure = Figure(f"late reply on {transport_name(broker_url)}")
    _check(figure, run, tmp_path, data, SagaStatus.COMPENSATED)
    kinds = [(h.kind, h.step) for h in run.history]
    assert ("step.failed", "reserve") in kinds
    assert ("step.succeeded", "reserve") not in kinds
    # The reservation was made (in time) and undone by the compensation.
    assert [(k.split(":", 1)[1], r) for k, r in _reservations(tmp_path)] == [
        ("reserve:action", 1)]
    figure.seconds = time.monotonic() - began
    assert figure.ok, figure.report()
    figure.report()


@bounded(60)
async def test_an_effect_applied_after_the_deadline_is_compensated(
        broker_url: str, names: Names, tmp_path: Path) -> None:
    """reserve's handler only writes after the deadline has passed; its compensation is
    already on its way and must still find (and undo) the reservation."""
    began = time.monotonic()
    behaviour = Behaviour()
    behaviour.reserve_delay = lambda cmd: DEADLINE + 1.0 if cmd.attempt == 1 else 0.0
    data = order_input(2, decline_every=0)
    run, _ = await _one_order(broker_url, names, tmp_path, saga_retry=ONE_ATTEMPT,
                              behaviour=behaviour, data=data)
    figure = Figure(f"late effect on {transport_name(broker_url)}")
    _check(figure, run, tmp_path, data, SagaStatus.COMPENSATED)
    assert [(k.split(":", 1)[1], r) for k, r in _reservations(tmp_path)] == [
        ("reserve:action", 1)]
    figure.seconds = time.monotonic() - began
    assert figure.ok, figure.report()
    figure.report()




@bounded(60)
async def test_a_decline_after_a_late_reply_compensates(names: Names, tmp_path: Path) -> None:
    """charge (the pivot) says no, but its first reply arrives after the deadline; the
    re-sent command (same key) gets the recorded "no" from the payments inbox. Nothing was
    charged, so the order must compensate (release the reservation).

    On memory:// only: the fault is in the decider, whatever the transport (it fails the
    same way on RabbitMQ, NATS and Redis)."""
    data = order_input(0)  # declined
    assert data["decline"]
    run, _ = await _one_order("memory://", names, tmp_path, saga_retry=RETRY,
                              late=_is_reply("charge", 1), data=data)
    with closing(sqlite3.connect(db_path(tmp_path, "payments"))) as conn:
        assert conn.execute("SELECT count(*) FROM charges").fetchone() == (0,)
    assert run.status is SagaStatus.COMPENSATED, run.error




@bounded(60)
async def test_an_action_redelivered_after_its_compensation_is_not_applied(
        names: Names, tmp_path: Path) -> None:
    """reserve's first delivery outlives the deadline, then fails transiently (a deadlock,
    say) and is given back; the release command, delivered meanwhile, runs first (nothing
    to undo yet); then reserve is redelivered and applies. The reservation must not stand
    under a COMPENSATED order.

    On memory:// only: the fault is in the participant's inbox, whatever the transport (it
    fails the same way on RabbitMQ, NATS and Redis)."""
    behaviour = Behaviour()
    behaviour.reserve_delay = lambda cmd: DEADLINE + 0.5 if cmd.attempt == 1 else 0.0
    behaviour.reserve_fails = lambda cmd: cmd.attempt == 1
    data = order_input(3, decline_every=0)
    run, _ = await _one_order("memory://", names, tmp_path, saga_retry=ONE_ATTEMPT,
                              behaviour=behaviour, linger=1.0, data=data)
    assert run.status is SagaStatus.COMPENSATED
    standing = [r for r in _reservations(tmp_path) if r[1] == 0]
    assert standing == [], f"a reservation stands under a COMPENSATED order: {standing}"
