"""Sagas the testing-kit tests explore: a correct one, and ones with the classic bugs."""

from __future__ import annotations

from typing import Any

from sagaway import RetryPolicy, Saga, StepContext


class Shop:
    """The participants' world: what each service has recorded, by idempotency key."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.stock = 10
        self.charged = 0
        self.reservations: dict[str, int] = {}
        self.charges: dict[str, int] = {}
        self.refunds: set[str] = set()
        self.shipped: set[str] = set()

    def snapshot(self) -> dict[str, Any]:
        return {"stock": self.stock, "charged": self.charged,
                "reservations": dict(self.reservations), "charges": dict(self.charges),
                "refunds": set(self.refunds), "shipped": set(self.shipped)}


def correct_saga(shop: Shop) -> Saga:
    """Every participant applies once per key and tolerates 'nothing to undo'."""
    order = Saga("order")

    @order.step
    def reserve(ctx: StepContext, data: Any) -> dict[str, int]:
        if ctx.idempotency_key not in shop.reservations:
            shop.reservations[ctx.idempotency_key] = 1
            shop.stock -= 1
        return {"reserved": 1}

    @reserve.compensation
    def release(ctx: StepContext, data: Any, result: Any) -> None:
        key = f"{ctx.run_id}:reserve:action"
        if shop.reservations.pop(key, None) is not None:
            shop.stock += 1

    @order.step(timeout=5)
    async def charge(ctx: StepContext, data: Any) -> dict[str, int]:
        if ctx.idempotency_key not in shop.charges:
            shop.charges[ctx.idempotency_key] = data["amount"]
            shop.charged += data["amount"]
        return {"amount": shop.charges[ctx.idempotency_key]}

    @charge.compensation
    async def refund(ctx: StepContext, data: Any, result: Any) -> None:
        # Look the charge up by its key: ``result`` is None when the charge timed out or
        # was cut by a crash, and the charge may have gone through all the same.
        amount = shop.charges.pop(f"{ctx.run_id}:charge:action", None)
        if amount is not None:
            shop.charged -= amount
            shop.refunds.add(ctx.idempotency_key)

    @order.step(pivot=True)
    def ship(ctx: StepContext, data: Any) -> str:
        shop.shipped.add(ctx.run_id)
        return "shipped"

    @order.step(retry=RetryPolicy(max_attempts=None, initial_backoff=1.0))
    def email(ctx: StepContext, data: Any) -> None:
        return None

    return order


def consistent(shop: Shop) -> Any:
    """The explorer's ``check``: the world matches how the run ended."""
    from sagaway import SagaStatus

    def check(outcome: Any) -> None:
        if outcome.status is SagaStatus.COMPENSATED:
            assert shop.stock == 10 and shop.charged == 0, (
                f"compensated, but stock={shop.stock} charged={shop.charged}")
        if outcome.status is SagaStatus.COMPLETED:
            assert shop.stock == 9 and shop.charged == 25, (
                f"completed, but stock={shop.stock} charged={shop.charged}")

    return check


def refund_trusts_result(shop: Shop) -> Saga:
    """The classic bug: the refund believes 'no result means no charge'."""
    order = correct_saga(shop)
    step = order["charge"]
    step.compensation_fn = None

    @step.compensation
    async def refund(ctx: StepContext, data: Any, result: Any) -> None:
        if result is None:
            return  # BUG: a charge that timed out or was cut by a crash may have gone through
        shop.charges.pop(f"{ctx.run_id}:charge:action", None)
        shop.charged -= result["amount"]

    return order


def refund_not_idempotent(shop: Shop) -> Saga:
    """Refunds every time it is invoked: a compensation re-run after a crash refunds twice."""
    order = correct_saga(shop)
    step = order["charge"]
    step.compensation_fn = None

    @step.compensation
    async def refund(ctx: StepContext, data: Any, result: Any) -> None:
        shop.charged -= data["amount"]  # BUG: not keyed by ctx.idempotency_key

    return order


def reserve_counter(shop: Shop) -> Saga:
    """A dict counter: reserving again with the same key reserves again."""
    order = correct_saga(shop)
    step = order["reserve"]

    def reserve(ctx: StepContext, data: Any) -> dict[str, int]:
        shop.stock -= 1  # BUG: applied on every invocation
        shop.reservations[ctx.idempotency_key] = 1
        return {"reserved": 1}

    step.action = reserve
    return order
