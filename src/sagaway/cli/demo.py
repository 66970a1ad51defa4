"""``sagaway demo``: an e-commerce order saga against pretend services, with faults on demand.

The saga (the one the README's quick start walks through)::

    reserve_inventory  ──compensation: release_inventory
    charge_payment     ──pivot: the point of no return
    arrange_shipping   ──retriable: after the pivot, retried until it succeeds

Every transition is printed as it becomes durable (a Listener on the Orchestrator). With
``fail_at`` a service fails; with ``crash_at`` the process SIGKILLs itself while that step
is in flight and prints the command that resumes the same run in a new process.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from sagaway import (
    HistoryEntry,
    Listener,
    Orchestrator,
    RetryPolicy,
    Saga,
    SagaRun,
    SQLiteStore,
    StepContext,
    Transition,
)
from sagaway.cli import render
from sagaway.cli.shop import SHIPPING_OUTAGE_ATTEMPTS, Ledger, LedgerEntry, Shop
from sagaway.store import open_store

__all__ = ["STEPS", "DemoError", "build_order_saga", "new_order", "resume_demo", "run_demo"]

STEPS = ("reserve_inventory", "charge_payment", "arrange_shipping")
LEASE_SECONDS = 2.0
"""Short, so a crashed demo's run is resumable after ~2 s (production uses ~30 s)."""
POLL_INTERVAL = 0.2
CRASH_DELAY = 0.05
"""Seconds after the step's start is durable: the action has applied its effect by then
(it does so before its first await) and is still "waiting for the service's reply"."""


SHIPPING_RETRY = RetryPolicy(max_attempts=None, initial_backoff=0.25, max_backoff=2.0, jitter=0.0)
"""After the pivot: retried until it succeeds (quick backoff, so the demo stays short)."""


class DemoError(Exception):
    """The demo cannot do what was asked (the message says why)."""


def build_order_saga(shop: Shop) -> Saga:
    """The order saga, its steps calling ``shop``'s services with their idempotency key."""
    order = Saga("order", version=1, description="reserve stock, charge the card, ship")

    @order.step
    async def reserve_inventory(ctx: StepContext, data: dict[str, Any]) -> dict[str, Any]:
        return await shop.reserve(ctx.idempotency_key, data["items"])

    @reserve_inventory.compensation
    async def release_inventory(ctx: StepContext, data: dict[str, Any],
                                result: dict[str, Any] | None) -> None:
        # result is None when the reservation was cut by a crash: release by key anyway.
        await shop.release(ctx.idempotency_key, result["reservation"] if result else None)

    @order.step(pivot=True)
    async def charge_payment(ctx: StepContext, data: dict[str, Any]) -> dict[str, Any]:
        return await shop.charge(ctx.idempotency_key, order_total(data))

    @order.step(retriable=True, retry=SHIPPING_RETRY)
    async def arrange_shipping(ctx: StepContext, data: dict[str, Any]) -> dict[str, Any]:
        return await shop.ship(ctx.idempotency_key, ctx.attempt, data["address"])

    return order


def order_total(data: Mapping[str, Any]) -> float:
    return round(sum(float(i["qty"]) * float(i["price"]) for i in data["items"]), 2)


def new_order() -> dict[str, Any]:
    return {
        "order_id": f"A-{int(time.time() * 1000) % 100_000:05d}",
        "customer": "ada@example.com",
        "items": [{"sku": "BOOK-42", "qty": 2, "price": 19.95},
                  {"sku": "MUG-7", "qty": 1, "price": 12.50}],
        "address": "12 Analytical Row, London",
    }


_SCENARIOS = {
    None: "every step succeeds.",
    "fail:reserve_inventory": "reserve_inventory fails for good (out of stock) before anything "
    "took effect: nothing to undo, so the run ends COMPENSATED at once.",
    "fail:charge_payment": "charge_payment fails for good (card declined). It is the pivot, "
    "so the steps before it are undone in reverse order (release_inventory) and the run "
    "ends COMPENSATED.",
    "fail:arrange_shipping": f"arrange_shipping fails its first {SHIPPING_OUTAGE_ATTEMPTS} "
    "attempts (carrier outage). Steps after the pivot (charge_payment) are retried until "
    "they succeed, never compensated: once the card is charged the saga only moves forward.",
    "crash": "this process kills itself with SIGKILL while {step} is in flight, after its "
    "start is durable. The printed command resumes the same run in a new process.",
}


def resume_command(run_id: str, store_url: str) -> str:
    return f"sagaway demo --resume {run_id} --store {shlex.quote(store_url)}"


class LiveTimeline(Listener):
    """Prints one run's transitions as they become durable, and its services' effects.

    Transitions that arrive before ``follow`` names the run are held back, so a run adopted
    from an earlier crashed demo never mixes into the output.
    """

    def __init__(self, console: Console, compensations: Mapping[str, str], *,
                 crash_at: str | None = None, store_url: str = "") -> None:
        self.console = console
        self.compensations = compensations
        self.crash_at = crash_at
        self.store_url = store_url
        self.run_id: str | None = None
        self.t0 = 0.0
        self.printed = 0
        """Entries of the followed run printed so far."""
        self._held: list[Transition] = []

    def follow(self, run_id: str, t0: float | None = None) -> None:
        """Print ``run_id``'s transitions, timed from ``t0`` (default: its first one held)."""
        held, self._held = self._held, []
        mine = [t for t in held if t.run_id == run_id and t.entries]
        self.run_id = run_id
        self.t0 = t0 if t0 is not None else mine[0].entries[0].at if mine else time.time()
        for transition in held:
            self.on_transition(transition)

    def on_transition(self, transition: Transition) -> None:
        if self.run_id is None:
            self._held.append(transition)
            return
        if transition.run_id != self.run_id:
            return
        for entry in transition.entries:
            self._print(entry)
            if entry.kind == "step.started" and entry.step and entry.step == self.crash_at:
                self._crash(entry.step)

    def catch_up(self, history: Sequence[HistoryEntry]) -> None:
        """Print the entries of the run started here that no transition reported.

        A listener can miss a run's final transition: a lease renewal answered while the
        commit that finishes the run (and drops its lease) is in flight makes the worker
        stop the driver before it notifies. The store's history is the record; fill in.
        """
        for entry in history[self.printed:]:
            self._print(entry)

    def _print(self, entry: HistoryEntry) -> None:
        self.printed += 1
        self.console.print(render.entry_line(entry, self.t0, self.compensations),
                           soft_wrap=True)

    def say(self, key: str, service: str, message: str) -> None:
        if self.run_id is not None and key.startswith(f"{self.run_id}:"):
            self.console.print(render.service_line(service, message), soft_wrap=True)

    def _crash(self, step: str) -> None:
        self.crash_at = None
        asyncio.get_running_loop().call_later(CRASH_DELAY, self._die, step)

    def _die(self, step: str) -> None:
        assert self.run_id is not None
        self.console.print()
        self.console.print(Text(f"💥 SIGKILL while {step} is in flight: its start is in the saga "
                                f"log, its result is not. Resume the same run with:",
                                style="bold magenta"), soft_wrap=True)
        self.console.print(Text(f"   {resume_command(self.run_id, self.store_url)}",
                                style="bold"), soft_wrap=True, highlight=False)
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _ledger_path(store: object) -> str:
    # The ledger shares the saga log's file, like a service's dedup table shares its database.
    return store.path if isinstance(store, SQLiteStore) else ":memory:"


def _ledger_table(entries: list[LedgerEntry]) -> Table:
    table = Table(header_style="bold", box=box.SIMPLE_HEAD)
    table.add_column("service", style="blue", no_wrap=True)
    table.add_column("idempotency key", no_wrap=True)
    table.add_column("calls", justify="right")
    table.add_column("effect", style="bright_black")
    for e in entries:
        _, _, step_key = e.key.partition(":")
        calls = Text(str(e.calls), style="bold magenta" if e.calls > 1 else "")
        table.add_row(e.service, f"…:{step_key}", calls, _flat(e.effect))
    return table


def _flat(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return json.dumps(value, default=str)


def _summary(console: Console, run: SagaRun, ledger: Ledger, store_url: str) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    grid.add_row("status", render.status_text(run.status))
    grid.add_row("run", Text(run.id, style="cyan"))
    grid.add_row("duration", Text.assemble(f"{render.duration_ms(run.history):.0f} ms ",
                                           (f"({len(run.history)} history entries)",
                                            "bright_black")))
    if run.error:
        grid.add_row("reason", Text(run.error, style="yellow"))
    if run.results:
        grid.add_row("results", render.results_grid(run.results))
    console.print()
    console.rule(Text("summary", style="bold"), align="left")
    console.print(grid)
    entries = ledger.entries(run.id)
    if entries:
        console.print()
        console.print(Text("the services' ledger: each effect applied once per idempotency key",
                           style="bold"))
        console.print(_ledger_table(entries))
    console.print(Text(f"see it again: sagaway show {run.id} --store {shlex.quote(store_url)}",
                       style="bright_black"), soft_wrap=True, highlight=False)


def _header(console: Console, saga: Saga, store_url: str, scenario: str) -> None:
    chain = " → ".join(
        f"{s.name} [{s.kind.value}]" if s.kind.value != "compensatable" else s.name
        for s in saga
    )
    console.print(Text.assemble(("sagaway demo", "bold"), f" · {saga.name} saga: ", chain),
                  soft_wrap=True)
    console.print(Text.assemble(("store ", "bold"), store_url), soft_wrap=True,
                  highlight=False)
    console.print(Text.assemble(("scenario ", "bold"), scenario), style="")


def _open(store_url: str, console: Console, *, fail_at: str | None = None,
          crash_at: str | None = None) -> tuple[Orchestrator, LiveTimeline, Ledger, Saga]:
    store = open_store(store_url)
    if crash_at is not None and not isinstance(store, SQLiteStore):
        raise DemoError("--crash-at needs a durable store (sqlite:///…) to resume from")
    ledger = Ledger(_ledger_path(store))
    timeline = LiveTimeline(console, {}, crash_at=crash_at, store_url=store_url)
    saga = build_order_saga(Shop(ledger, timeline.say, fail_at=fail_at))
    timeline.compensations = {s.name: s.compensation_fn.__name__ for s in saga
                              if s.compensation_fn is not None}
    orch = Orchestrator(store, sagas=[saga], lease_seconds=LEASE_SECONDS,
                        poll_interval=POLL_INTERVAL, listeners=[timeline])
    return orch, timeline, ledger, saga


async def run_demo(console: Console, store_url: str, *, fail_at: str | None = None,
                   crash_at: str | None = None) -> SagaRun:
    """Start one order, print its timeline live, then a summary; return the final run."""
    orch, timeline, ledger, saga = _open(store_url, console, fail_at=fail_at,
                                         crash_at=crash_at)
    scenario = (_SCENARIOS["crash"].format(step=crash_at) if crash_at
                else _SCENARIOS[f"fail:{fail_at}" if fail_at else None])
    _header(console, saga, store_url, scenario)
    try:
        async with orch:
            order = new_order()
            handle = await orch.start(saga.name, order)
            console.print(Text.assemble(
                ("\nrun ", "bold"), (handle.id, "cyan"),
                f"  order {order['order_id']}: {len(order['items'])} lines, "
                f"${order_total(order):.2f}\n"), soft_wrap=True)
            timeline.follow(handle.id)
            await handle.wait()
            run = await orch.get(handle.id)
        timeline.catch_up(run.history)
        _summary(console, run, ledger, store_url)
        return run
    finally:
        ledger.close()


async def resume_demo(console: Console, store_url: str, run_id: str) -> SagaRun:
    """Finish a demo run another process left behind; print its whole timeline."""
    orch, timeline, ledger, saga = _open(store_url, console)
    try:
        async with orch:
            run = await orch.get(run_id)
            if run.saga != saga.name:
                raise DemoError(f"run {run_id} is a {run.saga!r} run, not a demo order; "
                                f"the demo can only resume its own runs")
            _header(console, saga, store_url, f"resume run {run_id}")
            if run.finished:
                console.print(Text(f"\nthe run already finished ({run.status.value}); "
                                   f"nothing to resume", style="yellow"))
            else:
                _print_lease_wait(console, run, orch.worker_id)
                timeline.follow(run.id, run.created_at)
                await orch.wait(run.id)
            run = await orch.get(run.id)
        console.print(Text("\nthe whole timeline, from the store", style="bold underline"))
        console.print(render.timeline_table(run.history, timeline.compensations))
        _summary(console, run, ledger, store_url)
        return run
    finally:
        ledger.close()


def _print_lease_wait(console: Console, run: SagaRun, me: str) -> None:
    left = (run.lease_expires or 0.0) - time.time()
    if run.owner and run.owner != me and left > 0:
        console.print(Text(
            f"\nwaiting for the dead worker's lease to expire: {run.owner} holds the run for "
            f"{left:.1f} s more (lease_seconds={LEASE_SECONDS}); then this worker's recovery "
            f"poll claims it and resumes from its last durable transition.\n",
            style="magenta"), soft_wrap=True)
    else:
        console.print(Text("\nthe run's lease has expired: claiming it now and resuming from "
                           "its last durable transition.\n", style="magenta"), soft_wrap=True)
