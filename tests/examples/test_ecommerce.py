"""The e-commerce example as real processes: inventory, payment, shipping and the order
service (which runs the saga) under uvicorn on 127.0.0.1, each with its own database.

Invariants are checked twice: through the services' read endpoints (what the demo shows)
and straight from their SQLite files.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest
from examples.ecommerce.inventory import DEFAULT_STOCK
from examples.ecommerce.payment import DEFAULT_BALANCES
from examples.ecommerce.system import EcommerceSystem

pytestmark = pytest.mark.e2e


def rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute(sql).fetchall()


def check_databases(system: EcommerceSystem, orders: dict[str, dict[str, Any]]) -> None:
    """Stock and money conserved, read from the services' own SQLite files."""
    work = system.workdir
    completed = {i for i, o in orders.items() if o["status"] == "COMPLETED"}
    stock = dict(rows(work / "inventory.db", "SELECT sku, qty FROM stock"))
    reserved = rows(
        work / "inventory.db",
        "SELECT order_id, sku, qty FROM reservations WHERE status = 'reserved'",
    )
    for sku, initial in system.stock.items():
        assert stock[sku] + sum(q for _, s, q in reserved if s == sku) == initial, sku
    assert {r[0] for r in reserved} == completed
    for order_id, sku, qty in reserved:
        assert (sku, qty) == (orders[order_id]["input"]["sku"], orders[order_id]["input"]["qty"])
    balances = dict(rows(work / "payment.db", "SELECT customer, balance FROM accounts"))
    charged = rows(
        work / "payment.db", "SELECT order_id, amount FROM payments WHERE status = 'charged'"
    )
    assert sum(system.balances.values()) - sum(balances.values()) == sum(a for _, a in charged)
    assert {r[0] for r in charged} == completed
    shipped = rows(
        work / "shipping.db", "SELECT order_id FROM shipments WHERE status = 'scheduled'"
    )
    assert {r[0] for r in shipped} == completed


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EcommerceSystem]:
    with EcommerceSystem(tmp_path_factory.mktemp("ecommerce")) as system:
        yield system


@pytest.fixture(scope="module")
def placed(shop: EcommerceSystem) -> dict[str, dict[str, Any]]:
    """Orders that succeed and orders that fail at each step, run to their end."""
    ids = {
        "ok-1": shop.place(shop.order(qty=2)),
        "ok-2": shop.place(shop.order(sku="LAMP", customer="bob", amount=4500)),
        "reserve_inventory": shop.place(shop.order(fail_at="reserve_inventory")),
        "charge_payment": shop.place(shop.order(fail_at="charge_payment")),
        "arrange_shipping": shop.place(shop.order(fail_at="arrange_shipping", qty=3)),
        "unknown-item": shop.place(shop.order(sku="UNICORN")),
    }
    finished = shop.wait(ids.values(), timeout=60)
    return {name: finished[i] for name, i in ids.items()}


def step_statuses(order: dict[str, Any]) -> dict[str, str]:
    return {name: s["status"] for name, s in order["steps"].items()}


def test_an_order_that_succeeds_completes_every_step(placed: dict[str, dict[str, Any]]) -> None:
    for name in ("ok-1", "ok-2"):
        order = placed[name]
        assert order["status"] == "COMPLETED", order
        assert step_statuses(order) == dict.fromkeys(
            ["reserve_inventory", "charge_payment", "arrange_shipping"], "SUCCEEDED"
        )
        assert order["results"]["reserve_inventory"]["reservation_id"] == order["id"]
    assert placed["ok-2"]["results"]["charge_payment"] == {
        "payment_id": placed["ok-2"]["id"],
        "customer": "bob",
        "amount": 4500,
    }


def test_each_failure_point_undoes_what_went_before(placed: dict[str, dict[str, Any]]) -> None:
    out_of_stock = placed["reserve_inventory"]
    assert out_of_stock["status"] == "COMPENSATED"
    assert "out of stock" in out_of_stock["error"]
    assert step_statuses(out_of_stock) == {"reserve_inventory": "FAILED"}
    assert "unknown item 'UNICORN'" in placed["unknown-item"]["error"]

    broke = placed["charge_payment"]
    assert broke["status"] == "COMPENSATED"
    assert "402" in broke["error"] and "insufficient funds" in broke["error"]
    assert step_statuses(broke) == {"reserve_inventory": "COMPENSATED", "charge_payment": "FAILED"}

    atlantis = placed["arrange_shipping"]
    assert atlantis["status"] == "COMPENSATED"
    assert "we do not deliver to Atlantis" in atlantis["error"]
    assert step_statuses(atlantis) == {
        "reserve_inventory": "COMPENSATED",
        "charge_payment": "COMPENSATED",
        "arrange_shipping": "FAILED",
    }
    # A business "no" is answered once and not retried.
    assert atlantis["steps"]["arrange_shipping"]["attempts"] == 1


def test_no_stock_or_money_is_created_or_lost(
    shop: EcommerceSystem, placed: dict[str, dict[str, Any]]
) -> None:
    orders = {o["id"]: o for o in placed.values()}
    report = shop.check(orders)
    assert report.problems == []
    assert len(report.completed) == 2 and len(report.compensated) == 4
    check_databases(shop, orders)
    # Each step's key was recorded with the business change in the service's database.
    keys = {
        r[0]
        for r in rows(shop.workdir / "inventory.db", "SELECT idempotency_key FROM sagaway_inbox")
    }
    ok = placed["ok-1"]["id"]
    assert f"http:{ok}:reserve_inventory:action" in keys
    assert f"http:{placed['charge_payment']['id']}:reserve_inventory:compensation" in keys


def test_the_order_service_api(shop: EcommerceSystem) -> None:
    body = shop.order(qty=1)
    key = f"checkout-{uuid.uuid4()}"
    first = shop.place(body, key=key)
    assert shop.place(body, key=key) == first  # a retried POST is the same order
    conflict = shop.client.post(
        shop.orders.url + "/orders", json={**body, "qty": 2}, headers={"Idempotency-Key": key}
    )
    assert conflict.status_code == 422
    assert shop.wait([first])[first]["status"] == "COMPLETED"
    missing = shop.client.get(shop.orders.url + "/orders/nope")
    assert missing.status_code == 404
    bad = shop.client.post(shop.orders.url + "/orders", json={"qty": 0})
    assert bad.status_code == 422
    counts = shop.client.get(shop.orders.url + "/orders").json()
    assert counts["COMPLETED"] >= 1 and set(counts) >= {"RUNNING", "COMPENSATED", "FAILED"}


def test_a_service_replays_a_retried_request_instead_of_applying_it_again(
    shop: EcommerceSystem,
) -> None:
    body = {"order_id": f"direct-{uuid.uuid4()}", "sku": "MUG", "qty": 4}
    headers = {"Idempotency-Key": f"k-{uuid.uuid4()}"}
    before = shop.client.get(shop.inventory.url + "/stock").json()["MUG"]
    first = shop.client.post(shop.inventory.url + "/reservations", json=body, headers=headers)
    again = shop.client.post(shop.inventory.url + "/reservations", json=body, headers=headers)
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert shop.client.get(shop.inventory.url + "/stock").json()["MUG"] == before - 4
    undo = {"Idempotency-Key": f"u-{uuid.uuid4()}"}
    url = f"{shop.inventory.url}/reservations/{body['order_id']}"
    assert shop.client.delete(url, headers=undo).json()["released"] == 4
    assert shop.client.delete(url, headers=undo).json()["released"] == 4  # replayed
    assert shop.client.get(shop.inventory.url + "/stock").json()["MUG"] == before
    # A release that comes first fences the reservation that comes late.
    late = {"order_id": f"late-{uuid.uuid4()}", "sku": "MUG", "qty": 1}
    gone = shop.client.delete(
        f"{shop.inventory.url}/reservations/{late['order_id']}",
        headers={"Idempotency-Key": f"u-{uuid.uuid4()}"},
    )
    assert gone.status_code == 404
    refused = shop.client.post(
        shop.inventory.url + "/reservations",
        json=late,
        headers={"Idempotency-Key": f"k-{uuid.uuid4()}"},
    )
    assert refused.status_code == 422 and "cancelled" in refused.json()["detail"]
    assert shop.client.get(shop.inventory.url + "/stock").json()["MUG"] == before


async def place_many(
    system: EcommerceSystem, bodies: list[dict[str, Any]], kill_after: int, down_for: float
) -> list[str]:
    """Place the orders concurrently; SIGKILL the inventory service once ``kill_after`` are
    placed and restart it ``down_for`` seconds later, while the rest keep coming."""
    ids: list[str] = []
    sem = asyncio.Semaphore(10)
    enough = asyncio.Event()

    async def restart() -> None:
        await enough.wait()
        system.inventory.kill()
        await asyncio.sleep(down_for)
        system.inventory.start()
        await asyncio.to_thread(system.inventory.wait_ready)

    async with httpx.AsyncClient(timeout=30) as client:

        async def place(body: dict[str, Any]) -> None:
            async with sem:
                r = await client.post(system.orders.url + "/orders", json=body)
                r.raise_for_status()
                ids.append(r.json()["id"])
                if len(ids) >= kill_after:
                    enough.set()

        await asyncio.gather(restart(), *(place(b) for b in bodies))
    return ids


def test_inventory_killed_and_restarted_with_100_orders_in_flight(tmp_path: Path) -> None:
    with EcommerceSystem(tmp_path) as system:
        failing = {7: "charge_payment", 13: "arrange_shipping", 29: "reserve_inventory"}
        bodies = [
            system.order(fail_at=failing[n % 30])
            if n % 30 in failing
            else system.order(qty=1 + n % 3)
            for n in range(100)
        ]
        started = time.monotonic()
        ids = asyncio.run(place_many(system, bodies, kill_after=25, down_for=1.0))
        assert system.inventory.starts == 2
        orders = system.wait(ids, timeout=90)
        elapsed = time.monotonic() - started
        statuses = [o["status"] for o in orders.values()]
        assert len(orders) == 100
        assert set(statuses) <= {"COMPLETED", "COMPENSATED"}, statuses
        # The kill hit orders in flight: some reservations needed more than one attempt.
        retried = [o for o in orders.values() if o["steps"]["reserve_inventory"]["attempts"] > 1]
        assert retried, "no order saw the inventory service down"
        report = system.check(orders)
        assert report.problems == []
        check_databases(system, orders)
        print(
            f"\n100 orders, inventory killed: {len(report.completed)} completed, "
            f"{len(report.compensated)} compensated, {len(retried)} retried a reservation, "
            f"{elapsed:.1f} s"
        )
        planned = {
            i
            for i, o in orders.items()
            if o["input"]["qty"] == 1_000_000
            or o["input"]["customer"] == "broke"
            or o["input"]["address"] == "Atlantis"
        }
        assert len(planned) == 10
        assert planned <= report.compensated
        assert len(report.completed) >= 80, (len(report.completed), elapsed)


def test_the_services_on_postgresql(postgres_base_url: str, tmp_path: Path) -> None:
    schema = f"ex_{uuid.uuid4().hex[:10]}"
    sep = "&" if "?" in postgres_base_url else "?"
    urls = {
        name: f"{postgres_base_url}{sep}schema={schema}_{name}"
        for name in ("inventory", "payment", "shipping")
    }
    try:
        with EcommerceSystem(tmp_path, db_urls=urls) as system:
            ids = [
                system.place(system.order(qty=2)),
                system.place(system.order(qty=2)),
                system.place(system.order(fail_at="arrange_shipping")),
            ]
            orders = system.wait(ids, timeout=60)
            assert [orders[i]["status"] for i in ids] == ["COMPLETED", "COMPLETED", "COMPENSATED"]
            assert system.check(orders).problems == []
            assert system.client.get(system.inventory.url + "/stock").json()["BOOK"] == (
                DEFAULT_STOCK["BOOK"] - 4
            )
            assert sum(system.client.get(system.payment.url + "/accounts").json().values()) == (
                sum(DEFAULT_BALANCES.values()) - 2 * 1999
            )
    finally:
        asyncio.run(_drop(postgres_base_url, [f"{schema}_{n}" for n in urls]))


async def _drop(url: str, schemas: list[str]) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        for schema in schemas:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()
