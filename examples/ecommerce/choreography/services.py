"""The four services of the choreographed order flow, each with its own SQLite database.

Run one as a process (from the repository root)::

    python -m examples.ecommerce.choreography.services inventory \\
        --transport amqp://guest:guest@127.0.0.1:5672/ --db sqlite:///inventory.db
    python -m examples.ecommerce.choreography.services tracker \\
        --transport amqp://guest:guest@127.0.0.1:5672/ --store sqlite:///sagas.db

Change the transport URL to ``nats://127.0.0.1:4222`` to run the same flow over NATS.

The business rules give every failure path a trigger: inventory rejects an order for more
than it has, payment declines an amount over :data:`CARD_LIMIT`, shipping refuses a country
not in :data:`SHIPS_TO`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sqlite3
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from examples.ecommerce.choreography.flow import order_flow
from sagaway import NonRetryableError, SagaStatus
from sagaway.choreography import ChoreographedService, Choreography, Tracker
from sagaway.participant import Command

__all__ = [
    "CARD_LIMIT",
    "SERVICES",
    "SHIPS_TO",
    "Audit",
    "build_service",
    "check_invariants",
    "db_path",
    "main",
    "place_order",
]

CARD_LIMIT = 1000
"""Payment declines an order whose amount is over this."""
SHIPS_TO = frozenset({"FR", "DE", "US", "JP"})
"""Shipping refuses any other country."""
SERVICES = ("orders", "inventory", "payment", "shipping")

_SCHEMA = {
    "orders": "CREATE TABLE IF NOT EXISTS orders (order_id TEXT PRIMARY KEY, run_id TEXT, "
              "status TEXT NOT NULL, amount INTEGER NOT NULL)",
    "inventory": "CREATE TABLE IF NOT EXISTS stock (sku TEXT PRIMARY KEY, qty INTEGER NOT NULL);"
                 "CREATE TABLE IF NOT EXISTS reservations (id INTEGER PRIMARY KEY, "
                 "run_id TEXT NOT NULL, sku TEXT NOT NULL, qty INTEGER NOT NULL, "
                 "released INTEGER NOT NULL DEFAULT 0)",
    # No unique constraint on run_id: applying an event once is sagaway's job (the inbox),
    # and the tests count these rows to prove it.
    "payment": "CREATE TABLE IF NOT EXISTS payments (id INTEGER PRIMARY KEY, "
               "run_id TEXT NOT NULL, amount INTEGER NOT NULL, status TEXT NOT NULL)",
    "shipping": "CREATE TABLE IF NOT EXISTS shipments (id INTEGER PRIMARY KEY, "
                "run_id TEXT NOT NULL, country TEXT NOT NULL, tracking TEXT NOT NULL)",
}


def db_path(url: str) -> str:
    """The file of a ``sqlite:///path`` URL."""
    if not url.startswith("sqlite:///"):
        raise ValueError(f"the example's services use SQLite files, got {url!r}")
    return url.removeprefix("sqlite:///")


def init_db(service: str, url: str, *, stock: Mapping[str, int] | None = None) -> None:
    """Create the service's business tables (and, for inventory, its stock if empty)."""
    conn = sqlite3.connect(db_path(url))
    try:
        conn.executescript(_SCHEMA[service])
        if service == "inventory" and stock:
            conn.executemany("INSERT OR IGNORE INTO stock VALUES (?, ?)", list(stock.items()))
        conn.commit()
    finally:
        conn.close()


# -- the reactions --------------------------------------------------------------------------


def _inventory(svc: ChoreographedService) -> None:
    @svc.on("OrderCreated", emits=("StockReserved", "StockRejected"))
    def reserve(event: Command) -> dict[str, Any]:
        order = event.payload
        row = event.db.execute("SELECT qty FROM stock WHERE sku = ?", (order["sku"],)).fetchone()
        have = row[0] if row else 0
        if have < order["qty"]:
            raise NonRetryableError(f"out of stock: {order['sku']} has {have}, "
                                    f"order wants {order['qty']}")
        event.db.execute("UPDATE stock SET qty = qty - ? WHERE sku = ?",
                         (order["qty"], order["sku"]))
        event.db.execute("INSERT INTO reservations (run_id, sku, qty) VALUES (?, ?, ?)",
                         (event.run_id, order["sku"], order["qty"]))
        return {**order, "reserved": order["qty"]}

    def release(event: Command) -> None:
        rows = event.db.execute(
            "UPDATE reservations SET released = 1 WHERE run_id = ? AND released = 0 "
            "RETURNING sku, qty", (event.run_id,)).fetchall()
        for sku, qty in rows:  # none: nothing reserved (or released already)
            event.db.execute("UPDATE stock SET qty = qty + ? WHERE sku = ?", (qty, sku))

    svc.on("PaymentFailed", emits="StockReleased")(release)
    svc.on("PaymentRefunded", emits="StockReleased")(release)


def _payment(svc: ChoreographedService) -> None:
    @svc.on("StockReserved", emits=("PaymentCharged", "PaymentFailed"))
    def charge(event: Command) -> dict[str, Any]:
        order = event.payload
        if order["amount"] > CARD_LIMIT:
            raise NonRetryableError(f"card declined: {order['amount']} is over the "
                                    f"{CARD_LIMIT} limit")
        event.db.execute("INSERT INTO payments (run_id, amount, status) VALUES (?, ?, 'charged')",
                         (event.run_id, order["amount"]))
        return {**order, "charged": order["amount"]}

    @svc.on("ShippingFailed", emits="PaymentRefunded")
    def refund(event: Command) -> None:
        event.db.execute("UPDATE payments SET status = 'refunded' WHERE run_id = ? "
                         "AND status = 'charged'", (event.run_id,))


def _shipping(svc: ChoreographedService) -> None:
    @svc.on("PaymentCharged", emits=("ShippingArranged", "ShippingFailed"))
    def ship(event: Command) -> dict[str, Any]:
        order = event.payload
        if order["country"] not in SHIPS_TO:
            raise NonRetryableError(f"cannot ship to {order['country']}")
        tracking = f"TRK-{event.run_id[-8:]}"
        event.db.execute("INSERT INTO shipments (run_id, country, tracking) VALUES (?, ?, ?)",
                         (event.run_id, order["country"], tracking))
        return {**order, "tracking": tracking}


def _orders(svc: ChoreographedService) -> None:
    def settle(status: str) -> Any:
        def handler(event: Command) -> None:
            event.db.execute("UPDATE orders SET status = ? WHERE order_id = ?",
                             (status, event.payload["order_id"]))
        return handler

    svc.on("ShippingArranged")(settle("confirmed"))
    svc.on("StockRejected")(settle("cancelled"))
    svc.on("StockReleased")(settle("cancelled"))


_REACTIONS = {"orders": _orders, "inventory": _inventory, "payment": _payment,
              "shipping": _shipping}


def build_service(
    service: str,
    transport: Any,
    db: str,
    flow: Choreography,
    *,
    stock: Mapping[str, int] | None = None,
    **options: Any,
) -> ChoreographedService:
    """One of :data:`SERVICES`, its tables created in ``db`` (a ``sqlite:///`` URL)."""
    init_db(service, db, stock=stock)
    svc = ChoreographedService(service, transport, db, flow=flow, **options)
    _REACTIONS[service](svc)
    return svc


async def place_order(orders: ChoreographedService, order: Mapping[str, Any]) -> str:
    """Record the order and emit ``OrderCreated`` in one transaction; return the run id.

    Placing the same ``order_id`` again returns the first run's id.
    """

    def record(db: sqlite3.Connection, run_id: str) -> None:
        db.execute("INSERT INTO orders VALUES (?, ?, 'pending', ?)",
                   (order["order_id"], run_id, order["amount"]))

    run_id = await orders.start(dict(order), key=str(order["order_id"]), apply=record)
    return run_id


# -- checking the outcome -------------------------------------------------------------------


@dataclass
class Audit:
    """What the invariant check found."""

    checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db_path(url))
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def check_invariants(dbs: Mapping[str, str], runs: Mapping[str, SagaStatus],
                     initial_stock: Mapping[str, int]) -> Audit:
    """Check every finished run left the services consistent.

    COMPLETED: stock held, payment charged, one shipment, order confirmed. COMPENSATED:
    no stock held, nothing charged, no shipment, order cancelled. And no unit of stock is
    created or lost: initial = on shelf + held by active reservations.
    """
    audit = Audit()
    reservations = _rows(dbs["inventory"], "SELECT run_id, sku, qty, released FROM reservations")
    payments = _rows(dbs["payment"], "SELECT run_id, status FROM payments")
    shipments = _rows(dbs["shipping"], "SELECT run_id FROM shipments")
    for what, rows in (("reserved", reservations), ("charged", payments),
                       ("shipped", shipments)):
        per_run: dict[str, int] = {}
        for row in rows:
            per_run[row[0]] = per_run.get(row[0], 0) + 1
        audit.problems.extend(f"run {run_id} was {what} {n} times" for run_id, n
                              in per_run.items() if n > 1)
    held = {r[0]: r for r in reservations if not r[3]}
    charged = {r[0] for r in payments if r[1] == "charged"}
    shipped = {r[0] for r in shipments}
    orders = {r[0]: r[1] for r in _rows(dbs["orders"], "SELECT run_id, status FROM orders")}
    for run_id, status in runs.items():
        if not status.finished:
            continue
        audit.checked += 1
        if status is SagaStatus.COMPLETED:
            want = (True, True, True, "confirmed")
        elif status is SagaStatus.COMPENSATED:
            want = (False, False, False, "cancelled")
        else:
            audit.problems.append(f"run {run_id} ended {status.value}")
            continue
        got = (run_id in held, run_id in charged, run_id in shipped, orders.get(run_id))
        if got != want:
            audit.problems.append(
                f"run {run_id} is {status.value} but (stock held, charged, shipped, order) "
                f"= {got}, expected {want}"
            )
    shelf = dict(_rows(dbs["inventory"], "SELECT sku, qty FROM stock"))
    for sku, initial in initial_stock.items():
        in_use = sum(r[2] for r in reservations if r[1] == sku and not r[3])
        if shelf.get(sku, 0) + in_use != initial:
            audit.problems.append(f"stock of {sku}: {shelf.get(sku, 0)} on the shelf + {in_use} "
                                  f"held != {initial} at the start")
    return audit


# -- running one service as a process -------------------------------------------------------


async def _serve(args: argparse.Namespace) -> None:
    flow = order_flow(prefix=args.prefix, deadline=args.deadline)
    runner: ChoreographedService | Tracker
    if args.service == "tracker":
        if not args.store:
            raise SystemExit("the tracker needs --store")
        runner = Tracker(args.store, args.transport, [flow], poll_interval=0.2)
    else:
        if not args.db:
            raise SystemExit(f"{args.service} needs --db sqlite:///path.db")
        stock = {"sku-1": args.stock} if args.service == "inventory" else None
        runner = build_service(args.service, args.transport, args.db, flow, stock=stock,
                               relay_interval=0.2, grace=5.0)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runner.stop)
    await runner.open()
    print(f"ready {args.service}", flush=True)
    await runner.run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("service", choices=(*SERVICES, "tracker"))
    parser.add_argument("--transport", required=True)
    parser.add_argument("--db", help="the service's SQLite database (sqlite:///path.db)")
    parser.add_argument("--store", help="the tracker's saga log")
    parser.add_argument("--prefix", default="shop.order")
    parser.add_argument("--deadline", type=float, default=30.0)
    parser.add_argument("--stock", type=int, default=1000)
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                        format=f"%(asctime)s {args.service} %(levelname)s %(message)s")
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()

