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
from celery_helpers import FIGURES, Names, Worker, effects, new_worker, pg_effects, pg_prepare

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
    """One worker; a run that completes, a run that fails at each step and compensates
    exactly the steps before it (each effect and each compensation once), and a run whose
    task never answers, decided by the step's deadline."""
    w = new_worker(workers, broker=amqp_url, names=names, tmp_path=tmp_path, name="w1")
    await asyncio.to_thread(w.start)
    order = step_saga(names.queue)
    lost = Saga("celery_lost")
    celery_step(lost, "reserve", task="shop.reserve", compensation="shop.release",
                queue=names.queue, timeout=TIMEOUT)
    celery_step(lost, "pay", task="shop.pay", compensation="shop.refund", queue=names.queue,
                timeout=2.0, retry=RetryPolicy(max_attempts=2, initial_backoff=0.1))
    async with orchestrator(tmp_path, amqp_url, names, [order, lost]) as orch:
        silent = await orch.start("celery_lost", {"id": "silent", "ignore": "pay"})
        ok = await orch.start("celery_order", {"id": "ok"})
        failing = {step: await orch.start("celery_order", {"id": f"f-{step}", "fail": step})
                   for step in ("reserve", "pay", "ship")}
        done = await ok.wait(timeout=60)
        runs = {step: await h.wait(timeout=60) for step, h in failing.items()}
        unanswered = await silent.wait(timeout=60)

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
    # A task that never answers (Celery's Ignore): each attempt times out at the step's
    # deadline, possibly applied; after the retry, pay is refunded (result unknown) and
    # reserve released.
    assert unanswered.status is SagaStatus.COMPENSATED, unanswered.error
    timeouts = [e for e in unanswered.history if e.kind == "step.failed" and e.step == "pay"]
    assert [e.attempt for e in timeouts] == [1, 2]
    assert all(e.data.get("maybe_applied") for e in timeouts)
    assert ledger[(f"{unanswered.id}:pay:compensation", "refund")] == 1
    assert ledger[(f"{unanswered.id}:reserve:compensation", "release")] == 1
    # Every row of the ledger is accounted for: nothing ran twice, nothing else ran.
    assert all(n == 1 for n in ledger.values()), ledger


async def test_chain_retries_and_time_limits(amqp_url: str, names: Names, tmp_path: Path,
                                             workers: list[Worker]) -> None:
    """saga_chain on a real worker: a chain completes with chain semantics (each task gets
    the previous result); ``self.retry`` twice is one attempt of the step (no reply until
    the final outcome); a failing link compensates; a soft and a hard time limit count as
    possibly applied, so the step is compensated with an unknown result."""
    w = new_worker(workers, broker=amqp_url, names=names, tmp_path=tmp_path, name="w1")
    await asyncio.to_thread(w.start)
    chain = chain_saga(names.queue)
    once = RetryPolicy(max_attempts=1)
    soft = step_saga(names.queue, soft_time_limit=1.0, pay_retry=once)
    soft.name = "celery_soft"
    hard = Saga("celery_hard")
    celery_step(hard, "reserve", task="shop.reserve", compensation="shop.release",
                queue=names.queue, timeout=TIMEOUT)
    celery_step(hard, "pay", task="shop.pay", compensation="shop.refund", queue=names.queue,
                timeout=TIMEOUT, time_limit=1.5, retry=once)
    async with orchestrator(tmp_path, amqp_url, names, [chain, soft, hard]) as orch:
        ok = await chain.start(orch, {"id": "c-ok", "retries": {"pay": 2}})
        bad = await chain.start(orch, {"id": "c-bad", "fail": "ship"})
        s = await orch.start("celery_soft", {"id": "soft", "soft": "pay"})
        h = await orch.start("celery_hard", {"id": "hard", "soft": "pay"})
        unusable = await orch.start("celery_chain_order", ["not", "a", "chain", "input"])
        done, failed = await ok.wait(timeout=60), await bad.wait(timeout=60)
        soft_run, hard_run = await s.wait(timeout=60), await h.wait(timeout=60)
        refused = await unusable.wait(timeout=60)

    ledger = effects(tmp_path / "shop.db")
    assert done.status is SagaStatus.COMPLETED, done.error
    result = chain.result(done)
    assert result["reservation"] == "r-c-ok" and result["payment"] == "p-c-ok"
    assert result["shipment"] == "s-c-ok"
    # Celery retried pay twice inside one saga attempt.
    assert [a for a in done.history if a.kind == "step.started" and a.step == "pay"][-1] \
        .attempt == 1
    assert ledger[(f"{done.id}:pay:action", "pay")] == 1

    assert failed.status is SagaStatus.COMPENSATED, failed.error
    assert ledger[(f"{failed.id}:pay:compensation", "refund")] == 1
    assert ledger[(f"{failed.id}:reserve:compensation", "release")] == 1

    for run in (soft_run, hard_run):
        assert run.status is SagaStatus.COMPENSATED, run.error
        failure = [e for e in run.history if e.kind == "step.failed" and e.step == "pay"]
        assert failure and failure[-1].data.get("maybe_applied") is True, failure
        assert "TimeLimitExceeded" in failure[-1].data["error"]
        # pay may have taken effect: refunded, with the result unknown; its own writes were
        # rolled back with the inbox transaction.
        assert ledger[(f"{run.id}:pay:compensation", "refund")] == 1
        assert ledger[(f"{run.id}:pay:action", "pay")] == 0
        assert ledger[(f"{run.id}:reserve:compensation", "release")] == 1
    # A task call that cannot be built fails the step (never the commit); nothing ran.
    assert refused.status is SagaStatus.COMPENSATED
    assert refused.error is not None and "could not be built" in refused.error
    assert not [k for k in ledger if k[0].startswith(refused.id)]
    assert all(n == 1 for n in ledger.values()), ledger


@pytest.fixture(params=["sqlite", "postgres"])
def inbox(request: pytest.FixtureRequest) -> tuple[str, dict[str, str]]:
    """Where the tasks keep their inbox and ledger: the SQLite file, or PostgreSQL."""
    if request.param == "sqlite":
        return "sqlite", {}
    return "postgres", {"SHOP_DB_URL": request.getfixturevalue("postgres_url")}


async def test_worker_sigkilled_mid_task_and_restarted(amqp_url: str, names: Names,
                                                       tmp_path: Path, workers: list[Worker],
                                                       inbox: tuple[str, dict[str, str]]
                                                       ) -> None:
    """The worker (parent and pool child) is SIGKILLed while ``pay`` is inside its
    transaction, its ledger row written but not committed. RabbitMQ redelivers the task
    (acks_late) to the restarted worker; the runs end COMPLETED or COMPENSATED as their
    input says, every effect applied once. With the inbox in SQLite and in PostgreSQL."""
    kind, env = inbox
    if kind == "postgres":
        await pg_prepare(env["SHOP_DB_URL"])
    w = new_worker(workers, broker=amqp_url, names=names, tmp_path=tmp_path, name="w1",
                   env=env)
    await asyncio.to_thread(w.start)
    chain = chain_saga(names.queue)
    ledger_path = tmp_path / "shop.db"
    async with orchestrator(tmp_path, amqp_url, names, [chain]) as orch:
        victim = await chain.start(orch, {"id": "k-1", "crash_once": "pay"})
        marker = Path(f"{ledger_path}.{victim.id}_pay_action.started")
        deadline = time.monotonic() + 30
        while not await asyncio.to_thread(marker.exists):
            assert time.monotonic() < deadline, "pay never started"
            await asyncio.sleep(0.05)
        others = [await chain.start(orch, {"id": f"k-{i}", "fail": "ship" if i % 2 else None})
                  for i in range(2, 8)]
        await asyncio.sleep(0.2)
        w.kill()
        restarted = new_worker(workers, broker=amqp_url, names=names, tmp_path=tmp_path,
                               name="w1b", env=env)
        await asyncio.to_thread(restarted.start)
        runs = [await h.wait(timeout=60) for h in (victim, *others)]

    ledger = (await pg_effects(env["SHOP_DB_URL"]) if kind == "postgres"
              else effects(ledger_path))
    assert runs[0].status is SagaStatus.COMPLETED, runs[0].error
    assert ledger[(f"{victim.id}:pay:action", "pay")] == 1
    for i, run in enumerate(runs[1:], start=2):
        want = SagaStatus.COMPENSATED if i % 2 else SagaStatus.COMPLETED
        assert run.status is want, (i, run.error)
    assert all(n == 1 for n in ledger.values()), ledger
    redelivered = restarted.log.read_text()
    assert f"{victim.id}:pay:action:1" in redelivered  # the same attempt, delivered again
    FIGURES.append(f"worker SIGKILLed mid-task ({kind} inbox): {len(runs)} runs, 0 lost, "
                   f"0 double-applied ({sum(ledger.values())} effects)")


async def test_200_sagas_through_two_workers(amqp_url: str, names: Names, tmp_path: Path,
                                             workers: list[Worker],
                                             inbox: tuple[str, dict[str, str]]) -> None:
    """200 sagas (3 Celery tasks each, a quarter compensating) through two worker
    processes sharing the queue: all end as their input says, each effect once."""
    kind, env = inbox
    if kind == "postgres":
        await pg_prepare(env["SHOP_DB_URL"])
    ws = [new_worker(workers, broker=amqp_url, names=names, tmp_path=tmp_path, name=f"w{i}",
                     env=env) for i in (1, 2)]
    await asyncio.gather(*(asyncio.to_thread(w.start) for w in ws))
    order = step_saga(names.queue)
    n = 200
    async with orchestrator(tmp_path, amqp_url, names, [order]) as orch:
        began = time.perf_counter()
        handles = await asyncio.gather(*(
            orch.start("celery_order", {"id": f"b-{i}", "fail": "ship" if i % 4 == 0 else None})
            for i in range(n)))
        runs = await asyncio.gather(*(h.wait(timeout=120) for h in handles))
        elapsed = time.perf_counter() - began

    ledger = (await pg_effects(env["SHOP_DB_URL"]) if kind == "postgres"
              else effects(tmp_path / "shop.db"))
    statuses = [r.status for r in runs]
    assert statuses.count(SagaStatus.COMPENSATED) == n // 4
    assert statuses.count(SagaStatus.COMPLETED) == n - n // 4
    assert all(c == 1 for c in ledger.values()), "an effect was applied twice"
    # 150 * 3 actions + 50 * (2 actions + 2 compensations) rows.
    assert sum(ledger.values()) == (n - n // 4) * 3 + (n // 4) * 4
    served = [w.log.read_text().count(" succeeded in ") for w in ws]
    assert all(s > 0 for s in served), served  # both workers took tasks
    rate = n / elapsed
    FIGURES.append(f"200 sagas (3 Celery tasks each) through 2 prefork workers, {kind} "
                   f"inbox: {elapsed:.1f} s, {rate:.0f} sagas/s; tasks per worker {served}")
    print(f"\n200 sagas through 2 celery workers ({kind} inbox): {rate:.0f} sagas/s "
          f"({elapsed:.1f} s)")


async def test_worker_killed_after_commit_before_its_reply(amqp_url: str, names: Names,
                                                           tmp_path: Path,
                                                           workers: list[Worker]) -> None:
    """``pay`` commits (effect and inbox record), then its worker is SIGKILLed before the
    reply goes out. The unacked task is redelivered to the restarted worker, which answers
    from the inbox without running ``pay`` again: the run completes, pay applied once."""
    w = new_worker(workers, broker=amqp_url, names=names, tmp_path=tmp_path, name="w1",
                   env={"SHOP_KILL_BEFORE_REPLY": "pay"})
    await asyncio.to_thread(w.start)
    order = step_saga(names.queue)
    async with orchestrator(tmp_path, amqp_url, names, [order]) as orch:
        handle = await orch.start("celery_order", {"id": "lost-reply"})
        assert w.proc is not None
        await asyncio.to_thread(w.proc.wait, 30)  # it kills itself before the reply
        restarted = new_worker(workers, broker=amqp_url, names=names, tmp_path=tmp_path,
                               name="w1b")
        await asyncio.to_thread(restarted.start)
        run = await handle.wait(timeout=60)

    assert run.status is SagaStatus.COMPLETED, run.error
    marker = await asyncio.to_thread(
        Path(f"{tmp_path / 'shop.db'}.killed-before-reply").read_text)
    assert marker == f"{run.id}:pay:action:1"
    ledger = effects(tmp_path / "shop.db")
    assert ledger[(f"{run.id}:pay:action", "pay")] == 1
    assert all(n == 1 for n in ledger.values()), ledger
    # The redelivered task ran on the new worker and answered from the inbox.
    assert f"{run.id}:pay:action:1] succeeded" in restarted.log.read_text()


class Twice(CeleryTransport):
    """Publishes every outbox message twice, as a relay that died between publish and
    mark-sent would."""

    async def _publish(self, destination: str, body: bytes, *, message_id: str | None) -> None:
        await super()._publish(destination, body, message_id=message_id)
        await super()._publish(destination, body, message_id=message_id)


async def test_duplicate_tasks_and_an_orchestrator_restart(amqp_url: str, names: Names,
                                                           tmp_path: Path,
                                                           workers: list[Worker]) -> None:
    """Every task message is published twice, and the orchestrator is closed while runs
    are in flight and replaced by a new one on the same store: every run still ends as its
    input says, each effect once; the duplicate replies are recorded and ignored."""
    w = new_worker(workers, broker=amqp_url, names=names, tmp_path=tmp_path, name="w1")
    await asyncio.to_thread(w.start)
    order = step_saga(names.queue)
    store = f"sqlite:///{tmp_path / 'sagas.db'}"
    n = 30

    def orch() -> Orchestrator:
        return Orchestrator(store, sagas=[order], transport=Twice(amqp_url),
                            reply_to=names.replies, poll_interval=0.2)

    async with orch() as first:
        handles = [await first.start("celery_order",
                                     {"id": f"d-{i}", "fail": "pay" if i % 3 == 0 else None})
                   for i in range(n)]
        await asyncio.sleep(0.15)
        active = [r for r in [await first.get(h.id) for h in handles] if not r.finished]
    assert active, "every run had finished before the orchestrator was replaced"
    async with orch() as second:
        runs = [await second.wait(h.id, timeout=60) for h in handles]

    ledger = effects(tmp_path / "shop.db")
    for i, run in enumerate(runs):
        want = SagaStatus.COMPENSATED if i % 3 == 0 else SagaStatus.COMPLETED
        assert run.status is want, (i, run.error)
    assert all(c == 1 for c in ledger.values()), "an effect was applied twice"
    assert sum(ledger.values()) == (n - n // 3) * 3 + (n // 3) * 2
    ignored = sum(1 for r in runs for e in r.history if e.kind == "event.ignored")
    assert ignored > 0  # duplicate replies reached the runs and were ignored
    FIGURES.append(f"every Celery task published twice, orchestrator replaced mid-flight: "
                   f"{n} runs ({len(active)} in flight at the handover), 0 lost, "
                   f"0 double-applied, {ignored} duplicate replies ignored")


async def test_celery_steps_with_the_payload_codec_on(amqp_url: str, names: Names,
                                                     tmp_path: Path,
                                                     workers: list[Worker]) -> None:
    """With the codec, the outbox seals every payload, Celery calls included: the
    CeleryTransport opens them to send task messages, the runs complete and compensate as
    without it, and the saga log holds no plaintext input."""
    from sagaway.protection import AesGcmCodec, generate_key

    codec = AesGcmCodec({"k1": generate_key()})
    canary = "canary-7c1e5b"
    w = new_worker(workers, broker=amqp_url, names=names, tmp_path=tmp_path, name="w1")
    await asyncio.to_thread(w.start)
    async with Orchestrator(f"sqlite:///{tmp_path / 'sagas.db'}",
                            sagas=[step_saga(names.queue)], codec=codec,
                            transport=CeleryTransport(amqp_url, codec=codec),
                            reply_to=names.replies, poll_interval=0.2) as orch:
        ok = await orch.start("celery_order", {"id": canary})
        failing = await orch.start("celery_order", {"id": f"{canary}-f", "fail": "ship"})
        done, undone = await ok.wait(timeout=60), await failing.wait(timeout=60)
    assert done.status is SagaStatus.COMPLETED, done.error
    assert done.results["ship"]["shipment"] == f"s-{canary}"
    assert undone.status is SagaStatus.COMPENSATED, undone.error
    ledger = effects(tmp_path / "shop.db")
    assert ledger[(f"{undone.id}:pay:compensation", "refund")] == 1
    assert canary.encode() not in stored_bytes(tmp_path)


def stored_bytes(directory: Path) -> bytes:
    """The saga log's SQLite file and its WAL, as bytes."""
    return b"".join(p.read_bytes() for p in directory.glob("sagas.db*"))
