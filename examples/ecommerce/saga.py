"""The order saga: reserve stock, charge the customer, arrange shipping — or undo.

::

    reserve_inventory  POST {inventory}/reservations  undo DELETE …/reservations/{run_id}
    charge_payment     POST {payment}/payments        undo DELETE …/payments/{run_id}
    arrange_shipping   POST {shipping}/shipments      undo DELETE …/shipments/{run_id}

The order id is the run id: every service keys its record by it, so a compensation finds
what to undo from the order alone, even when its action timed out and never answered.
Failure in payment releases the stock; failure in shipping refunds and releases.

Import :data:`order` and :func:`build_orchestrator` (the order service does; so do tests).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, Field

from sagaway import Listener, Orchestrator, RetryPolicy, Saga, StepContext

__all__ = ["STEPS", "OrderIn", "build_orchestrator", "order"]


class OrderIn(BaseModel):
    """What ``POST /orders`` takes (the run's input)."""

    customer: str = "alice"
    sku: str = "BOOK"
    qty: int = Field(default=1, gt=0)
    amount: int = Field(default=1999, gt=0, description="cents")
    address: str = "1 Main St, Springfield"


class Reservation(BaseModel):
    reservation_id: str
    sku: str
    qty: int


class Payment(BaseModel):
    payment_id: str
    customer: str
    amount: int


class Shipment(BaseModel):
    shipment_id: str
    address: str


# A service that restarts is back within seconds: ride it out rather than compensate.
RETRY = RetryPolicy(max_attempts=10, initial_backoff=0.2, max_backoff=2.0)
TIMEOUT = 5.0
STEPS = ("reserve_inventory", "charge_payment", "arrange_shipping")

order = Saga("place_order", description="reserve stock, charge, ship")

order.http_step(
    "reserve_inventory",
    "POST",
    "{inventory}/reservations",
    compensation=("DELETE", "{inventory}/reservations/{run_id}"),
    json=lambda ctx, data: _body(ctx, data, "sku", "qty"),
    response_model=Reservation,
    timeout=TIMEOUT,
    retry=RETRY,
)
order.http_step(
    "charge_payment",
    "POST",
    "{payment}/payments",
    compensation=("DELETE", "{payment}/payments/{run_id}"),
    json=lambda ctx, data: _body(ctx, data, "customer", "amount"),
    response_model=Payment,
    timeout=TIMEOUT,
    retry=RETRY,
)
order.http_step(
    "arrange_shipping",
    "POST",
    "{shipping}/shipments",
    compensation=("DELETE", "{shipping}/shipments/{run_id}"),
    json=lambda ctx, data: _body(ctx, data, "address"),
    response_model=Shipment,
    timeout=TIMEOUT,
    retry=RETRY,
)


def _body(ctx: StepContext, data: Mapping[str, Any], *fields: str) -> dict[str, Any]:
    return {"order_id": ctx.run_id, **{f: data[f] for f in fields}}


def build_orchestrator(
    store: str = "sqlite:///orders.db",
    *,
    services: Mapping[str, str] | None = None,
    listeners: Iterable[Listener] = (),
    **options: Any,
) -> Orchestrator:
    """An orchestrator that runs :data:`order`.

    Args:
        store: the saga store URL (the order service's own database).
        services: base URLs of ``inventory``, ``payment`` and ``shipping`` (default: the
            ``SAGAWAY_SERVICE_INVENTORY`` … environment variables).
        listeners, options: passed to :class:`~sagaway.Orchestrator`.
    """
    return Orchestrator(
        store, sagas=[order], services=dict(services or {}), listeners=listeners, **options
    )
