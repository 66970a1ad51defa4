"""The choreographed order demo: real service processes, N sagas, a progress bar, a summary.

``inventory``, ``payment``, ``shipping`` and the tracker run as separate processes (the
``services`` module's command line); ``orders`` runs here and places the orders. Some
orders are built to fail (a declined card, a country shipping refuses, more than the stock),
so the summary shows both endings; then every service's database is checked against the
runs the tracker recorded (:func:`~examples.ecommerce.choreography.services.check_invariants`).

::

    python -m examples.ecommerce.choreography.demo --transport amqp://guest:guest@127.0.0.1:5672/
    sagaway demo ecommerce --style choreography --transport nats://127.0.0.1:4222
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from examples.ecommerce.choreography.flow import order_flow
from examples.ecommerce.choreography.services import (
    Audit,
    build_service,
    check_invariants,
    place_order,
)
from sagaway import Orchestrator, SagaStatus
from sagaway.choreography import ChoreographedService

__all__ = ["DemoResult", "main", "run_demo", "start_process"]

ROOT = Path(__file__).resolve().parents[3]
"""The repository root (so ``python -m examples…`` finds the example)."""
STOCK = 1000


@dataclass
class DemoResult:
    """How the demo's sagas ended."""

    counts: dict[str, int] = field(default_factory=dict)
    audit: Audit = field(default_factory=Audit)
    seconds: float = 0.0
    run_ids: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.audit.ok and not self.counts.get("stuck") and not self.counts.get("FAILED")


def start_process(service: str, *, transport: str, prefix: str, db: str | None = None,
                  store: str | None = None, deadline: float = 30.0,
                  stock: int = STOCK) -> subprocess.Popen[str]:
    """Start one service (or ``tracker``) of the example as a process; return once it is
    subscribed (it prints ``ready``)."""
    args = [sys.executable, "-m", "examples.ecommerce.choreography.services", service,
            "--transport", transport, "--prefix", prefix, "--deadline", str(deadline),
            "--stock", str(stock)]
    if db:
        args += ["--db", db]
    if store:
        args += ["--store", store]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    proc.stdout.close()  # it prints nothing else (logs go to stderr)
    if not line.startswith("ready"):
        proc.kill()
        raise RuntimeError(f"{service} did not start (exit code {proc.wait()}); see its stderr")
    return proc


def _order(i: int) -> dict[str, Any]:
    order: dict[str, Any] = {"order_id": f"order-{i}", "sku": "sku-1", "qty": 1,
                             "amount": 20 + i % 50, "country": "FR"}
    if i % 10 == 3:
        order["amount"] = 5000  # declined: stock released
    elif i % 10 == 7:
        order["country"] = "XX"  # refused: payment refunded, then stock released
    elif i % 25 == 11:
        order["qty"] = STOCK * 10  # out of stock: nothing to undo
    return order


async def run_demo(console: Console, *, transport: str, n: int = 50,
                   workdir: Path | None = None, deadline: float = 30.0,
                   timeout: float = 120.0) -> DemoResult:
    """Run ``n`` choreographed order sagas over ``transport`` and check the outcome."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="sagaway-choreo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    prefix = f"demo.{uuid.uuid4().hex[:8]}.order"
    flow = order_flow(prefix=prefix, deadline=deadline)
    dbs = {s: f"sqlite:///{workdir / s}.db" for s in ("orders", "inventory", "payment",
                                                     "shipping")}
    store = f"sqlite:///{workdir / 'sagas.db'}"
    console.print(f"[bold]choreographed order saga[/] over {transport.split('@')[-1]}: "
                  f"{n} orders, services in {workdir}")
    procs: dict[str, subprocess.Popen[str]] = {}
    result = DemoResult()
    try:
        # The tracker first (it creates the saga log), then the services.
        procs["tracker"] = start_process("tracker", transport=transport, prefix=prefix,
                                         store=store, deadline=deadline)
        for service in ("inventory", "payment", "shipping"):
            procs[service] = start_process(service, transport=transport, prefix=prefix,
                                           db=dbs[service], deadline=deadline)
        orders: ChoreographedService = build_service("orders", transport, dbs["orders"], flow,
                                                     relay_interval=0.2)
        started = time.monotonic()
        async with orders, Orchestrator(store, worker=False) as reader:
            for i in range(n):
                result.run_ids.append(await place_order(orders, _order(i)))
            with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                          MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
                task = bar.add_task("sagas finished", total=n)
                statuses: dict[str, SagaStatus] = {}
                while time.monotonic() - started < timeout:
                    runs = await reader.list(saga=flow.name, limit=10_000)
                    statuses = {r.id: r.status for r in runs if r.id in set(result.run_ids)}
                    finished = sum(s.finished for s in statuses.values())
                    stuck = sum(1 for r in runs if (r.error or "").startswith("stuck"))
                    bar.update(task, completed=finished)
                    if finished + stuck >= n:
                        break
                    await asyncio.sleep(0.2)
            result.seconds = time.monotonic() - started
            runs = await reader.list(saga=flow.name, limit=10_000)
        mine = [r for r in runs if r.id in set(result.run_ids)]
        counts = {s.value: 0 for s in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED,
                                       SagaStatus.FAILED)}
        counts["stuck"] = counts["running"] = 0
        for r in mine:
            if r.status.finished:
                counts[r.status.value] = counts.get(r.status.value, 0) + 1
            elif (r.error or "").startswith("stuck"):
                counts["stuck"] += 1
            else:
                counts["running"] += 1
        counts["not recorded"] = n - len(mine)
        result.counts = counts
        result.audit = check_invariants(dbs, {r.id: r.status for r in mine}, {"sku-1": STOCK})
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.poll() is None:
                proc.kill()
    _summary(console, result, n, store)
    return result


def _summary(console: Console, result: DemoResult, n: int, store: str) -> None:
    table = Table(title=f"{n} choreographed sagas in {result.seconds:.1f}s")
    table.add_column("outcome")
    table.add_column("runs", justify="right")
    styles = {"COMPLETED": "green", "COMPENSATED": "yellow", "FAILED": "red", "stuck": "red",
              "running": "cyan", "not recorded": "red"}
    for name, count in result.counts.items():
        table.add_row(f"[{styles.get(name, '')}]{name}[/]", str(count))
    verdict = ("[green]✔ invariants hold[/]" if result.audit.ok
               else f"[red]✘ {len(result.audit.problems)} invariant violation(s)[/]")
    table.add_row("invariant check", f"{verdict} ({result.audit.checked} runs)")
    console.print(table)
    for problem in result.audit.problems[:20]:
        console.print(f"  [red]✘[/] {problem}")
    console.print(f"list them: [bold]sagaway runs --store {store}[/]; one timeline: "
                  f"[bold]sagaway show RUN_ID --store {store}[/]", soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The choreographed order saga demo.")
    parser.add_argument("--transport", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("-n", type=int, default=50)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args(argv)
    result = asyncio.run(run_demo(Console(), transport=args.transport, n=args.n,
                                  workdir=args.workdir))
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
