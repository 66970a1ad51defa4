"""The order saga: reserve stock, charge the customer, arrange shipping — or undo.

::

    reserve_inventory  POST {inventory}/reservations  undo DELETE …/reservations/{run_id}
    charge_payment     POST {payment}/payments        undo DELETE …/payments/{run_id}
    arrange_shipping   POST {shipping}/shipments      undo DELETE …/shipments/{run_id}

The order id is the run id: every service keys its record by it, so a compensation finds
what to undo from the order alone, even when its action timed out and never answered.
Failure in payment releases the stock; failure in shipping refunds and releases.

The order carries the customer's card, which only the payment service may see: the saga
declares ``card.number`` and ``card.cvc`` sensitive (:data:`SENSITIVE`), so sagaway shows
them as ``***`` in its errors, logs, spans, metrics, CLI and admin views. Two careless
habits are left in on purpose, to show that: the payment service quotes the card number in
its refusals, and the charge step logs it (at DEBUG) — sagaway's ``RunContextFilter`` masks
it in the log line.

Import :data:`order` and :func:`build_orchestrator` (the order service does; so do tests).
:func:`order_saga` builds the same saga with other sensitive paths (a test builds it with
none, to prove its scan would see a leak).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, Field

from sagaway import Listener, Orchestrator, RetryPolicy, Saga, StepContext

__all__ = ["SENSITIVE", "STEPS", "Card", "OrderIn", "build_orchestrator", "order", "order_saga"]


class Card(BaseModel):
    """The customer's card: digits only (the payment service checks the number's Luhn
    digit and refuses a bad one with 402)."""

    number: str = Field(pattern=r"^[0-9]{12,19}$")
    cvc: str = Field(pattern=r"^[0-9]{3,4}$")


class OrderIn(BaseModel):
    """What ``POST /orders`` takes (the run's input)."""

    customer: str = "alice"
    sku: str = "BOOK"
    qty: int = Field(default=1, gt=0)
    amount: int = Field(default=1999, gt=0, description="cents")
    address: str = "1 Main St, Springfield"
    card: Card


class Reservation(BaseModel):
    reservation_id: str
    sku: str
    qty: int


class Payment(BaseModel):
    payment_id: str
    customer: str
    amount: int
    card_last4: str


class Shipment(BaseModel):
    shipment_id: str
    address: str


log = logging.getLogger("examples.ecommerce.orders")

# A service that restarts is back within seconds: ride it out rather than compensate.
RETRY = RetryPolicy(max_attempts=10, initial_backoff=0.2, max_backoff=2.0)
TIMEOUT = 5.0
STEPS = ("reserve_inventory", "charge_payment", "arrange_shipping")
SENSITIVE = ("card.number", "card.cvc")
"""The input paths sagaway never shows (``***``)."""


def order_saga(*, sensitive: Sequence[str] = SENSITIVE) -> Saga:
    """The order saga, declaring ``sensitive`` paths (default :data:`SENSITIVE`)."""
    saga = Saga("place_order", description="reserve stock, charge, ship", sensitive=list(sensitive))
    _add_steps(saga)
    return saga


def _add_steps(saga: Saga) -> None:
    saga.http_step(
        "reserve_inventory",
        "POST",
        "{inventory}/reservations",
        compensation=("DELETE", "{inventory}/reservations/{run_id}"),
        json=lambda ctx, data: _body(ctx, data, "sku", "qty"),
        response_model=Reservation,
        timeout=TIMEOUT,
        retry=RETRY,
    )
    saga.http_step(
        "charge_payment",
        "POST",
        "{payment}/payments",
        compensation=("DELETE", "{payment}/payments/{run_id}"),
        json=_charge_body,
        response_model=Payment,
        timeout=TIMEOUT,
        retry=RETRY,
    )
    saga.http_step(
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


def _charge_body(ctx: StepContext, data: Mapping[str, Any]) -> dict[str, Any]:
    log.debug("charging %s cents to card %s", data["amount"], data["card"]["number"])
    return _body(ctx, data, "customer", "amount", "card")


order = order_saga()
"""The order saga, as the order service runs it."""


def build_orchestrator(
    store: str = "sqlite:///orders.db",
    *,
    services: Mapping[str, str] | None = None,
    listeners: Iterable[Listener] = (),
    saga: Saga = order,
    **options: Any,
) -> Orchestrator:
    """An orchestrator that runs :data:`order`.

    Args:
        store: the saga store URL (the order service's own database).
        services: base URLs of ``inventory``, ``payment`` and ``shipping`` (default: the
            ``SAGAWAY_SERVICE_INVENTORY`` … environment variables).
        listeners, options: passed to :class:`~sagaway.Orchestrator`.
        saga: the order saga to run (default :data:`order`; see :func:`order_saga`).
    """
    return Orchestrator(
        store, sagas=[saga], services=dict(services or {}), listeners=listeners, **options
    )
