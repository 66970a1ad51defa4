"""The order service: ``POST /orders`` starts the order saga, ``GET /orders/{id}`` shows it.

Run::

    ORDERS_DB=sqlite:///orders.db \
    SAGAWAY_SERVICE_INVENTORY=http://127.0.0.1:8001 SAGAWAY_SERVICE_PAYMENT=http://127.0.0.1:8002 \
    SAGAWAY_SERVICE_SHIPPING=http://127.0.0.1:8003 \
    uvicorn --factory examples.ecommerce.orders:from_env --port 8000

It runs the orchestrator: its database is the saga store, so an order survives the order
service's own crash and is resumed when it restarts.
"""

from __future__ import annotations

import os

from fastapi import FastAPI

from examples.ecommerce.saga import OrderIn, build_orchestrator, order
from examples.sagaapi import create_saga_api


def create_app(store: str, *, services: dict[str, str] | None = None) -> FastAPI:
    return create_saga_api(
        title="orders",
        resource="orders",
        saga=order.name,
        model=OrderIn,
        build=lambda: build_orchestrator(store, services=services, poll_interval=0.5),
    )


def from_env() -> FastAPI:
    """``ORDERS_DB`` (default ``sqlite:///orders.db``) and ``SAGAWAY_SERVICE_<NAME>``."""
    return create_app(os.environ.get("ORDERS_DB", "sqlite:///orders.db"))
