"""The whole e-commerce system as processes: four uvicorn services on free ports.

``sagaway demo ecommerce`` and the tests drive it through :class:`EcommerceSystem`: start,
place orders through the order service, wait for them, check the invariants, stop.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from examples.ecommerce.inventory import DEFAULT_STOCK
from examples.ecommerce.payment import DEFAULT_BALANCES
from examples.launch import SagaFront, Service, System

__all__ = ["FAILING_ORDERS", "TEST_CARD", "EcommerceSystem", "Invariants"]

TEST_CARD = {"number": "4242424242424242", "cvc": "123"}
"""The card a generated order pays with (a well-known test number; its Luhn digit holds)."""

FAILING_ORDERS: dict[str, dict[str, Any]] = {
    "reserve_inventory": {"qty": 1_000_000},  # more than is in stock
    "charge_payment": {"customer": "broke"},  # a balance of 0
    "arrange_shipping": {"address": "Atlantis"},  # not delivered to
}
"""What to change in an order to make it fail at each step (``--fail-at``)."""


@dataclass
class Invariants:
    """What the services' own state says about the orders."""

    completed: set[str]
    compensated: set[str]
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class EcommerceSystem(System):
    """Inventory, payment, shipping and order services in ``workdir`` (SQLite files there,
    unless ``db_urls`` names other databases per service)."""

    def __init__(
        self,
        workdir: Path,
        *,
        db_urls: dict[str, str] | None = None,
        stock: dict[str, int] | None = None,
        balances: dict[str, int] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.stock = dict(DEFAULT_STOCK if stock is None else stock)
        self.balances = dict(DEFAULT_BALANCES if balances is None else balances)
        urls = {
            name: f"sqlite:///{self.workdir / name}.db"
            for name in ("inventory", "payment", "shipping", "orders")
        }
        urls.update(db_urls or {})
        self.db_urls = urls
        logs = self.workdir / "logs"
        self.inventory = Service(
            "inventory",
            "examples.ecommerce.inventory:from_env",
            log_dir=logs,
            env={"INVENTORY_DB": urls["inventory"], "INVENTORY_STOCK": json.dumps(self.stock)},
        )
        self.payment = Service(
            "payment",
            "examples.ecommerce.payment:from_env",
            log_dir=logs,
            env={"PAYMENT_DB": urls["payment"], "PAYMENT_BALANCES": json.dumps(self.balances)},
        )
        self.shipping = Service(
            "shipping",
            "examples.ecommerce.shipping:from_env",
            log_dir=logs,
            env={"SHIPPING_DB": urls["shipping"]},
        )
        self.orders = Service(
            "orders",
            "examples.ecommerce.orders:from_env",
            log_dir=logs,
            env={
                "ORDERS_DB": urls["orders"],
                "SAGAWAY_SERVICE_INVENTORY": self.inventory.url,
                "SAGAWAY_SERVICE_PAYMENT": self.payment.url,
                "SAGAWAY_SERVICE_SHIPPING": self.shipping.url,
            },
        )
        self.services = [self.inventory, self.payment, self.shipping, self.orders]
        self.client = httpx.Client(timeout=30.0)
        self.front = SagaFront(self.orders, "orders", self.client)

    def order(self, fail_at: str | None = None, **fields: Any) -> dict[str, Any]:
        """An order's body: a valid one, or one that fails at step ``fail_at``."""
        body: dict[str, Any] = {
            "customer": "alice",
            "sku": "BOOK",
            "qty": 1,
            "amount": 1999,
            "address": "1 Main St, Springfield",
            "card": dict(TEST_CARD),
        }
        if fail_at is not None:
            body.update(FAILING_ORDERS[fail_at])
        body.update(fields)
        return body

    def place(self, body: dict[str, Any], *, key: str | None = None) -> str:
        """``POST /orders``; the order's id."""
        return self.front.place(body, key=key)

    def get(self, order_id: str) -> dict[str, Any]:
        return self.front.get(order_id)

    def wait(self, ids: Iterable[str], timeout: float = 60.0) -> dict[str, dict[str, Any]]:
        """Wait until every order has finished (TimeoutError after ``timeout`` seconds)."""
        return self.front.wait(ids, timeout)

    def check(self, orders: dict[str, dict[str, Any]] | None = None) -> Invariants:
        """Compare the services' state with the finished ``orders`` (all orders placed):
        stock and money neither created nor lost, and only completed orders hold any."""
        # Default: every order placed through this system.
        if orders is None:
            orders = self.wait(self.front.placed)
        completed = {i for i, o in orders.items() if o["status"] == "COMPLETED"}
        compensated = {i for i, o in orders.items() if o["status"] == "COMPENSATED"}
        report = Invariants(completed, compensated)
        problems = report.problems
        other = {i: o["status"] for i, o in orders.items() if i not in completed | compensated}
        if other:
            problems.append(f"orders neither completed nor compensated: {other}")
        get = self.client.get
        stock = get(self.inventory.url + "/stock").json()
        held = get(self.inventory.url + "/reservations").json()
        for sku, initial in self.stock.items():
            now, kept = stock.get(sku, 0), held["held"].get(sku, 0)
            if now + kept != initial:
                problems.append(f"stock of {sku}: {now} in stock + {kept} reserved != {initial}")
        sold: dict[str, int] = {}
        for i in completed:
            sku = orders[i]["input"]["sku"]
            sold[sku] = sold.get(sku, 0) + orders[i]["input"]["qty"]
        if sold != {k: v for k, v in held["held"].items() if v}:
            problems.append(f"reserved stock {held['held']} != completed orders' {sold}")
        if set(held["orders"]) != completed:
            problems.append(
                f"orders holding stock != completed orders: "
                f"{sorted(set(held['orders']) ^ completed)[:5]}"
            )
        payments = get(self.payment.url + "/payments").json()
        balances = get(self.payment.url + "/accounts").json()
        taken = sum(self.balances.values()) - sum(balances.values())
        owed = sum(orders[i]["input"]["amount"] for i in completed)
        if not (taken == payments["charged"] == owed):
            problems.append(
                f"money: balances lost {taken}, charges held {payments['charged']}, "
                f"completed orders cost {owed}"
            )
        if set(payments["orders"]) != completed:
            problems.append("orders charged != completed orders")
        shipments = get(self.shipping.url + "/shipments").json()
        if set(shipments["orders"]) != completed:
            problems.append("orders with a scheduled shipment != completed orders")
        return report
