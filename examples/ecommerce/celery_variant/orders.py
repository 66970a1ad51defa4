"""The orchestrator's side: the order saga over the shop's Celery tasks.

``python -m examples.ecommerce.celery_variant.orders`` (with a worker running, see
README.md) places three orders — one ships, one is declined at payment, one cannot be
shipped — and prints how each ended.

Before (no compensation, no durable state, no recovery)::

    chain(reserve.s(order), charge.s(), ship.s()).delay()

After (the same tasks, each with its undo; durable, compensating)::

    place_order = saga_chain((reserve.s(), release.s()), (charge.s(), refund.s()),
                             (ship.s(), None), name="place_order")
    await place_order.start(orch, order)
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

from sagaway import Orchestrator
from sagaway.integrations.celery import CeleryTransport, saga_chain

from . import tasks

place_order = saga_chain(
    (tasks.reserve.s(), tasks.release.s()),
    (tasks.charge.s(), tasks.refund.s()),
    (tasks.ship.s(), None),  # the point of no return: shipped orders are not undone
    name="place_order",
    queue=tasks.QUEUE,
    timeout=60,
)

ORDERS: list[dict[str, Any]] = [
    {"id": "o-1", "sku": "book", "qty": 1, "amount": 12.5},
    {"id": "o-2", "sku": "book", "qty": 2, "amount": 25.0, "card": "declined"},
    {"id": "o-3", "sku": "book", "qty": 1, "amount": 12.5, "address": "nowhere"},
]


def orchestrator() -> Orchestrator:
    """A worker for ``sagaway worker --app examples.ecommerce.celery_variant.orders:orchestrator``
    (the saga log from ``$ORDERS_STORE``, default ``sqlite:///orders.db``)."""
    return Orchestrator(os.environ.get("ORDERS_STORE", "sqlite:///orders.db"),
                        sagas=[place_order], transport=CeleryTransport(tasks.BROKER))


async def place(orders: list[dict[str, Any]], *, store: str, broker: str,
                reply_to: str = "sagaway.replies") -> list[tuple[str, str, Any]]:
    """Run each order as a saga; return (order id, final status, result or error)."""
    async with Orchestrator(store, sagas=[place_order], transport=CeleryTransport(broker),
                            reply_to=reply_to) as orch:
        handles = [await place_order.start(orch, order, key=order["id"]) for order in orders]
        runs = [await h.wait(timeout=120) for h in handles]
    return [(o["id"], r.status.value, place_order.result(r) or r.error)
            for o, r in zip(orders, runs, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="sqlite:///orders.db")
    parser.add_argument("--broker", default=tasks.BROKER)
    args = parser.parse_args()
    for order_id, status, detail in asyncio.run(place(ORDERS, store=args.store,
                                                      broker=args.broker)):
        print(f"{order_id}: {status}  {detail}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
