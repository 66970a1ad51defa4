"""What the tracker writes, read through every surface; and the parts as real processes.

* the admin API (httpx over ASGI), ``sagaway runs`` / ``sagaway show`` (real processes) and
  listeners (what metrics hook into) see choreographed runs like orchestrated ones;
* two trackers consuming one queue over PostgreSQL keep one writer per run;
* services as processes: SIGKILL one mid-flow, restart it, every saga completes;
* ``sagaway demo ecommerce --style choreography`` runs the example end to end, and refuses
  options that belong to the other demos.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from choreo_helpers import STOCK, Shop, events_of, order
from examples.ecommerce.choreography.demo import ROOT, start_process

from sagaway import Listener, SagaStatus, Transition
from sagaway.admin import Role, create_app
from sagaway.choreography import TRACKER, emit_event
from sagaway.messaging import open_transport

TIMEOUT = 90


def sagaway_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    return subprocess.run([sys.executable, "-m", "sagaway.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)


def spawn(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """Start ``sagaway ARGS`` as a process (its stderr piped)."""
    return subprocess.Popen([sys.executable, "-m", "sagaway.cli", *args], cwd=cwd, env=env,
                            stderr=subprocess.PIPE, text=True)


class Recorder(Listener):
    def __init__(self) -> None:
        self.transitions: list[Transition] = []

    def on_transition(self, transition: Transition) -> None:
        self.transitions.append(transition)


async def test_admin_api_cli_and_listeners_show_choreographed_runs(
        amqp_url: str, tmp_path: Path) -> None:
    shop = Shop(amqp_url, tmp_path)
    recorder = Recorder()
    await shop.open(tracker=False)
    await shop.start_tracker(listeners=[recorder])
    try:
        ok = await shop.place(order(1))
        undone = await shop.place(order(2, amount=5000))
        await shop.wait([ok, undone])
    finally:
        await shop.aclose()

    # Listeners got every transition, with the statuses the run went through.
    statuses = {run_id: [t.status for t in recorder.transitions if t.run_id == run_id]
                for run_id in (ok, undone)}
    assert statuses[ok][-1] is SagaStatus.COMPLETED
    assert statuses[undone] == [SagaStatus.RUNNING, SagaStatus.RUNNING,
                                SagaStatus.COMPENSATING, SagaStatus.COMPENSATED]
    assert all(t.saga == shop.flow.name for t in recorder.transitions)
    kinds = [e.kind for t in recorder.transitions if t.run_id == ok for e in t.entries]
    assert kinds[0] == "run.started" and kinds[-1] == "run.finished"

    # The admin API.
    app = create_app(shop.store_url, tokens={"s" * 32: Role.VIEWER})
    headers = {"Authorization": f"Bearer {'s' * 32}"}
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://admin.test") as http:
        page = (await http.get("/api/runs", params={"saga": shop.flow.name},
                               headers=headers)).json()
        assert {r["id"]: r["status"] for r in page["runs"]} == {
            ok: "COMPLETED", undone: "COMPENSATED"}
        detail = (await http.get(f"/api/runs/{undone}", headers=headers)).json()
        assert [h["kind"] for h in detail["history"]] == [
            "run.started", "step.started", "step.succeeded", "step.started", "step.failed",
            "run.compensating", "compensation.started", "compensation.succeeded",
            "run.finished"]
        assert detail["error"].startswith("charge_payment failed (PaymentFailed): card declined")
        counts = (await http.get("/api/runs/counts", params={"saga": shop.flow.name},
                                 headers=headers)).json()
        assert counts["counts"]["COMPLETED"] == 1 and counts["counts"]["COMPENSATED"] == 1

    # The CLI, as a real process.
    listed = sagaway_cli("runs", "--store", shop.store_url, "--saga", shop.flow.name)
    assert listed.returncode == 0, listed.stderr
    assert ok in listed.stdout and undone in listed.stdout
    assert "COMPLETED" in listed.stdout and "COMPENSATED" in listed.stdout
    shown = sagaway_cli("show", undone, "--store", shop.store_url)
    assert shown.returncode == 0, shown.stderr
    for text in ("COMPENSATED", "step.failed", "charge_payment", 'event="PaymentFailed"',
                 "compensation.succeeded", "reserve_stock", 'event="StockReleased"'):
        assert text in shown.stdout, (text, shown.stdout)


async def test_two_trackers_on_one_queue_keep_one_writer_per_run(
        amqp_url: str, postgres_url: str, tmp_path: Path) -> None:
    shop = Shop(amqp_url, tmp_path, store_url=postgres_url)
    await shop.open(tracker=False)
    await shop.start_tracker(owner="tracker-a", prefetch=20)
    await shop.start_tracker(owner="tracker-b", prefetch=20)
    try:
        ids = [await shop.place(order(i, **({"country": "XX"} if i % 3 == 0 else {})))
               for i in range(30)]
        runs = await shop.wait(ids, timeout=60)
        for i, run in enumerate(runs):
            want = SagaStatus.COMPENSATED if i % 3 == 0 else SagaStatus.COMPLETED
            assert run.status is want, (run.id, run.error)
            events = events_of(run)
            assert len(events) == len(set(events)) == (6 if i % 3 == 0 else 4), run.history
            assert [h.kind for h in run.history].count("run.finished") == 1
        await shop.settle_outboxes()
        await asyncio.sleep(0.5)
        audit = shop.audit(runs)
        assert audit.ok, audit.problems
    finally:
        await shop.aclose()


@pytest.mark.e2e
async def test_a_killed_service_process_resumes_its_queue_after_a_restart(
        amqp_url: str, tmp_path: Path) -> None:
    shop = Shop(amqp_url, tmp_path)
    procs: dict[str, subprocess.Popen[str]] = {}

    def start(service: str) -> None:
        procs[service] = start_process(service, transport=amqp_url, prefix=shop.prefix,
                                       db=shop.dbs.get(service), store=shop.store_url,
                                       stock=STOCK)

    await shop.store.open()
    await shop.reader.open()
    try:
        start(TRACKER)
        for service in ("inventory", "payment", "shipping"):
            start(service)
        await shop.start_service("orders")
        first = [await shop.place(order(i)) for i in range(10)]
        procs["shipping"].send_signal(signal.SIGKILL)  # mid-flow: some orders not shipped
        procs["shipping"].wait(10)
        second = [await shop.place(order(i + 10, **({"amount": 5000} if i % 2 else {})))
                  for i in range(10)]
        await shop.wait(second, until=lambda r: len(events_of(r)) >= 3)
        waiting = [r for r in [await shop.get(i) for i in first + second]
                   if r is not None and not r.status.finished]
        assert waiting, "shipping was down: some runs must be waiting for it"
        assert all((r.steps or {})["arrange_shipping"]["status"] == "RUNNING"
                   for r in waiting)
        start("shipping")
        runs = await shop.wait(first + second, timeout=60)
        assert [r.status for r in runs] == [SagaStatus.COMPLETED] * 10 + [
            SagaStatus.COMPENSATED if i % 2 else SagaStatus.COMPLETED for i in range(10)]
        await shop.settle_outboxes()
        await asyncio.sleep(0.5)
        audit = shop.audit(runs)
        assert audit.ok, audit.problems
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        await shop.aclose()


@pytest.mark.e2e
async def test_demo_choreography_runs_the_example_and_checks_invariants(
        amqp_url: str, tmp_path: Path) -> None:
    result = await asyncio.to_thread(
        sagaway_cli, "demo", "ecommerce", "--style", "choreography", "--transport", amqp_url,
        "-n", "20",
        "--workdir", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stdout + result.stderr
    for text in ("20 choreographed sagas", "COMPLETED", "COMPENSATED",
                 "invariants hold (20 runs)"):
        assert text in result.stdout, (text, result.stdout)
    # 20 orders: 2 declined (i % 10 == 3), 2 unshippable (i % 10 == 7), 1 out of stock
    # (i == 11): 15 completed, 5 compensated.
    rows = [line for line in result.stdout.splitlines() if "COMPLETED" in line
            or "COMPENSATED" in line]
    assert any(line.split("│")[2].strip() == "15" for line in rows if "COMPLETED" in line)
    assert any(line.split("│")[2].strip() == "5" for line in rows if "COMPENSATED" in line)


@pytest.mark.parametrize("args", [
    ["demo", "travel", "--style", "choreography"],
    ["demo", "ecommerce", "--style", "choreography", "--fail-at", "charge_payment"],
])
def test_the_choreographed_demo_refuses_what_it_does_not_take(args: list[str]) -> None:
    result = sagaway_cli(*args)
    assert result.returncode == 2
    assert "--style" in result.stdout + result.stderr




@pytest.mark.e2e
async def test_sagaway_choreography_track_runs_a_tracker_process(
        amqp_url: str, tmp_path: Path) -> None:
    shop = Shop(amqp_url, tmp_path)
    env = {**os.environ, "CHOREO_TEST_PREFIX": shop.prefix,
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(ROOT),
                                          os.environ.get("PYTHONPATH", "")])}
    proc = spawn("choreography", "track", "choreo_flows:from_env()", "--store",
                 shop.store_url, "--transport", amqp_url, cwd=tmp_path, env=env)
    try:
        async with open_transport(amqp_url) as transport:
            run_id = None
            for event in ("OrderCreated", "StockReserved", "PaymentCharged",
                          "ShippingArranged"):
                run_id = await emit_event(transport, shop.flow, event, {}, run_id=run_id)
        await shop.store.open()
        await shop.reader.open()
        assert run_id is not None
        (run,) = await shop.wait([run_id], timeout=30)
        assert run.status is SagaStatus.COMPLETED
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        await shop.aclose()
    assert proc.returncode == 0, stderr
    assert "tracking ['order-choreography']" in stderr
    bad = sagaway_cli("choreography", "track", "nope:flow", "--store", shop.store_url,
                      "--transport", amqp_url)
    assert bad.returncode == 2 and "cannot import 'nope'" in " ".join(
        bad.stderr.replace("│", " ").split())
