"""Sagas whose steps run on real ``celery worker`` processes over a real RabbitMQ.

Each test starts its workers (``celery -A celery_shop worker -Q <fresh queue>``, prefork,
one child) and an orchestrator on a SQLite saga log with :class:`CeleryTransport`. The
tasks write their effects to a SQLite ledger keyed by idempotency key, with no unique
constraint, so an effect applied twice is two rows.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import FIGURES, Names, Worker, effects, new_worker

from sagaway import Orchestrator, RetryPolicy, Saga, SagaRun, SagaStatus
from sagaway.integrations.celery import CeleryTransport, celery_step, saga_chain

pytestmark = pytest.mark.e2e

TIMEOUT = 30.0


def step_saga(queue: str, *, soft_time_limit: float | None = None,
              pay_retry: RetryPolicy | None = None) -> Saga:
    order = Saga("celery_order")
    celery_step(order, "reserve", task="shop.reserve", compensation="shop.release",
                queue=queue, timeout=TIMEOUT)
    celery_step(order, "pay", task="shop.pay", compensation="shop.refund", queue=queue,
                timeout=TIMEOUT, soft_time_limit=soft_time_limit, retry=pay_retry)
    celery_step(order, "ship", task="shop.ship", queue=queue, timeout=TIMEOUT, pivot=True)
    return order


def chain_saga(queue: str) -> Any:
    import celery_shop as shop

    return saga_chain(
        (shop.reserve.s().set(queue=queue), shop.release.s().set(queue=queue)),
        (shop.pay.s().set(queue=queue), shop.refund.s().set(queue=queue)),
        (shop.ship.s().set(queue=queue), None),
        name="celery_chain_order", timeout=TIMEOUT,
    )


def orchestrator(tmp_path: Path, amqp_url: str, names: Names, sagas: list[Saga]) -> Orchestrator:
    return Orchestrator(f"sqlite:///{tmp_path / 'sagas.db'}", sagas=sagas,
                        transport=CeleryTransport(amqp_url), reply_to=names.replies,
                        poll_interval=0.2)


def keys(run: SagaRun, *steps: str, compensation: bool = False) -> list[str]:
    kind = "compensation" if compensation else "action"
    return [f"{run.id}:{s}:{kind}" for s in steps]


async def test_success_and_every_failure_point(amqp_url: str, names: Names, tmp_path: Path,
                                               workers: list[Worker]) -> None:
    """One worker; a run that completes, and a run that fails at each step and compensates
    exactly the steps before it (each effect and each compensation once)."""
    w = new_worker(workers, broker=amqp_url, names=names, tmp_path=tmp_path, name="w1")
    await asyncio.to_thread(w.start)
    order = step_saga(names.queue)
    async with orchestrator(tmp_path, amqp_url, names, [order]) as orch:
        ok = await orch.start("celery_order", {"id": "ok"})
        failing = {step: await orch.start("celery_order", {"id": f"f-{step}", "fail": step})
                   for step in ("reserve", "pay", "ship")}
        done = await ok.wait(timeout=60)
        runs = {step: await h.wait(timeout=60) for step, h in failing.items()}

    assert done.status is SagaStatus.COMPLETED, done.error
    assert done.results["ship"]["shipment"] == "s-ok"
    assert done.results["reserve"]["reservation"] == "r-ok"
    ledger = effects(tmp_path / "shop.db")
    for k, task in zip(keys(done, "reserve", "pay", "ship"), ("reserve", "pay", "ship"),
                       strict=True):
        assert ledger[(k, task)] == 1

    # reserve says no: nothing to undo. pay says no: reserve released. ship (the pivot)
    # says no: pay refunded and reserve released.
    expected = {"reserve": [], "pay": ["reserve"], "ship": ["reserve", "pay"]}
    undo = {"reserve": "release", "pay": "refund"}
    for step, run in runs.items():
        assert run.status is SagaStatus.COMPENSATED, (step, run.error)
        for earlier in ("reserve", "pay"):
            action = ledger[(f"{run.id}:{earlier}:action", earlier)]
            comp = ledger[(f"{run.id}:{earlier}:compensation", undo[earlier])]
            want = 1 if earlier in expected[step] else 0
            assert (action, comp) == (want, want), (step, earlier, action, comp)
        assert ledger[(f"{run.id}:{step}:action", step)] == 0
    # Every row of the ledger is accounted for: nothing ran twice, nothing else ran.
    assert all(n == 1 for n in ledger.values()), ledger
