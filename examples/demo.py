"""``sagaway demo ecommerce|travel|bank``: an example system, for real, in one command.

The services start as processes (uvicorn) on free 127.0.0.1 ports, each with its own
SQLite database in a work directory; N sagas are started through the system's front
service; a progress bar follows them to their end; a table gives how many completed and
compensated and checks the invariants against the services' state (stock, money,
bookings); the services are stopped. With ``fail_at``, every second saga fails at that step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from examples.launch import FINISHED, SagaFront, Service, ServiceFailed

__all__ = ["EXAMPLES", "ExampleError", "run_example"]


class ExampleError(Exception):
    """The example cannot run (the message says why and what to do)."""


class _System(Protocol):
    services: list[Service]
    front: SagaFront
    db_urls: dict[str, str]

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def check(self, runs: dict[str, dict[str, Any]] | None = None) -> Any: ...


@dataclass(frozen=True)
class Example:
    title: str
    steps: tuple[str, ...]
    invariant: str
    """What the check proves, in words."""


EXAMPLES = {
    "ecommerce": Example(
        "e-commerce: inventory → payment → shipping over HTTP",
        ("reserve_inventory", "charge_payment", "arrange_shipping"),
        "stock and money conserved; only completed orders hold stock, charges, shipments",
    ),
    "travel": Example(
        "travel: flight, hotel and car booked in parallel over HTTP",
        ("book_flight", "book_hotel", "rent_car"),
        "no place created or lost; only completed trips hold bookings",
    ),
    "bank": Example(
        "bank transfer: debit bank A, credit bank B over RabbitMQ",
        ("debit", "credit"),
        "money conserved across both banks; balances moved by completed transfers only",
    ),
}


def _build(
    name: str, workdir: Path, amqp_url: str
) -> tuple[_System, Callable[[str | None], dict[str, Any]]]:
    if name == "ecommerce":
        from examples.ecommerce.system import EcommerceSystem

        shop = EcommerceSystem(workdir)
        return shop, lambda fail_at: shop.order(fail_at)
    if name == "travel":
        from examples.travel_booking.system import TravelSystem

        travel = TravelSystem(workdir)
        return travel, lambda fail_at: travel.trip(fail_at)
    from examples.bank_transfer.system import BankSystem, amqp_problem

    problem = asyncio.run(amqp_problem(amqp_url))
    if problem:
        raise ExampleError(
            f"the bank example needs RabbitMQ: {problem}. Start it (rabbitmq-server -detached) "
            f"or point --amqp / SAGAWAY_AMQP_URL at one"
        )
    bank = BankSystem(workdir, amqp_url)
    return bank, lambda fail_at: bank.transfer(fail_at)


def run_example(
    console: Console,
    name: str,
    *,
    sagas: int,
    fail_at: str | None,
    workdir: Path,
    amqp_url: str,
    timeout: float = 300.0,
) -> bool:
    """Run example ``name``; True when every saga ended COMPLETED or COMPENSATED and the
    invariants hold.

    Raises:
        ExampleError: an unknown example or step, a broker that cannot be reached, a
            service that does not start.
    """
    example = EXAMPLES.get(name)
    if example is None:
        raise ExampleError(f"no example {name!r}; pick one of {', '.join(EXAMPLES)}")
    if fail_at is not None and fail_at not in example.steps:
        raise ExampleError(
            f"{name} has no step {fail_at!r}; its steps are {', '.join(example.steps)}"
        )
    system, body = _build(name, workdir, amqp_url)
    console.print(
        Text.assemble(("sagaway demo ", "bold"), (name, "bold cyan"), f"  {example.title}")
    )
    with console.status(f"starting {len(system.services)} services…"):
        try:
            system.start()
        except ServiceFailed as exc:
            raise ExampleError(f"a service did not start: {exc}") from None
    try:
        console.print(_services_table(system))
        started = time.monotonic()
        ok = _drive(console, system, body, sagas=sagas, fail_at=fail_at, timeout=timeout)
        elapsed = time.monotonic() - started
        with console.status("checking the invariants against the services' databases…"):
            report = system.check()
        console.print(_outcome_table(example, report, sagas, elapsed, fail_at))
        console.print(Text(f"databases and logs: {workdir}", style="bright_black"))
        return ok and report.ok
    finally:
        with console.status("stopping the services…"):
            system.stop()


def _drive(
    console: Console,
    system: _System,
    body: Callable[[str | None], dict[str, Any]],
    *,
    sagas: int,
    fail_at: str | None,
    timeout: float,
) -> bool:
    front = system.front
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("[green]{task.fields[ok]} completed[/] "
                   "[yellow]{task.fields[undone]} compensated[/]"),
        TimeElapsedColumn(), console=console, transient=False,
    )  # fmt: skip
    with progress:
        task = progress.add_task("sagas", total=sagas, ok=0, undone=0)
        # Placed by a few clients at once, as a shop's web servers would.
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(front.place, [body(fail_at if n % 2 else None) for n in range(sagas)]))
        deadline = time.monotonic() + timeout
        while True:
            counts = front.counts()
            done = sum(counts.get(s, 0) for s in FINISHED)
            progress.update(task, completed=done, ok=counts.get("COMPLETED", 0),
                            undone=counts.get("COMPENSATED", 0))  # fmt: skip
            if done >= sagas:
                return counts.get("FAILED", 0) == 0
            if time.monotonic() > deadline:
                raise ExampleError(f"{sagas - done} sagas unfinished after {timeout:.0f} s")
            time.sleep(0.1)


def _services_table(system: _System) -> Table:
    table = Table(box=box.SIMPLE, show_header=True, header_style="bold")
    table.add_column("service")
    table.add_column("url")
    table.add_column("pid", justify="right")
    for service in system.services:
        table.add_row(service.name, service.url, str(service.proc.pid if service.proc else "-"))
    return table


def _outcome_table(
    example: Example, report: Any, sagas: int, elapsed: float, fail_at: str | None
) -> Table:
    table = Table(box=box.ROUNDED, show_header=False, title="outcome", title_style="bold")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("sagas", f"{sagas} in {elapsed:.1f} s ({sagas / max(elapsed, 1e-9):.0f}/s)")
    if fail_at:
        table.add_row("failing at", f"{fail_at} (every second saga)")
    table.add_row("completed", Text(str(len(report.completed)), style="green"))
    table.add_row("compensated", Text(str(len(report.compensated)), style="yellow"))
    other = sagas - len(report.completed) - len(report.compensated)
    table.add_row("other", Text(str(other), style="red" if other else "bright_black"))
    verdict = (Text("✓ holds", style="bold green") if report.ok
               else Text("✗ " + "; ".join(report.problems), style="bold red"))  # fmt: skip
    table.add_row("invariant", Text.assemble(verdict, "  ", (example.invariant, "bright_black")))
    return table
