"""The order flow, written down once: who reacts to what, and which event undoes which step.

::

    OrderCreated ─▶ inventory: reserve_stock ─▶ StockReserved | StockRejected
    StockReserved ─▶ payment: charge_payment ─▶ PaymentCharged | PaymentFailed
    PaymentCharged ─▶ shipping: arrange_shipping ─▶ ShippingArranged | ShippingFailed
    PaymentFailed ─▶ inventory releases the stock ─▶ StockReleased
    ShippingFailed ─▶ payment refunds ─▶ PaymentRefunded ─▶ inventory releases ─▶ StockReleased
"""

from __future__ import annotations

from sagaway.choreography import Choreography, FlowStep

__all__ = ["FLOW", "order_flow"]


def order_flow(*, prefix: str = "shop.order", deadline: float = 30.0) -> Choreography:
    """The flow; ``prefix`` names its queues (tests give each run of the suite its own)."""
    return Choreography(
        "order-choreography",
        start="OrderCreated",
        steps=[
            FlowStep("reserve_stock", service="inventory", on="OrderCreated",
                     success="StockReserved", failure="StockRejected",
                     compensate_on=("PaymentFailed", "PaymentRefunded"),
                     compensated="StockReleased"),
            FlowStep("charge_payment", service="payment", on="StockReserved",
                     success="PaymentCharged", failure="PaymentFailed",
                     compensate_on="ShippingFailed", compensated="PaymentRefunded"),
            FlowStep("arrange_shipping", service="shipping", on="PaymentCharged",
                     success="ShippingArranged", failure="ShippingFailed"),
        ],
        notify={"orders": ("ShippingArranged", "StockRejected", "StockReleased")},
        deadline=deadline,
        prefix=prefix,
    )


FLOW = order_flow()
"""The flow with its default queue names (``sagaway choreography draw
examples.ecommerce.choreography.flow:FLOW``)."""
