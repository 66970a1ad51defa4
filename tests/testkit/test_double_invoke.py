"""Double-invoke mode names the participants that are not idempotent."""

from __future__ import annotations

from typing import Any

import pytest
from testkit_sagas import Shop, correct_saga, refund_not_idempotent, reserve_counter

from sagaway import Saga, StepContext
from sagaway.testing import SafetyError, double_invoke


def test_idempotent_participants_pass() -> None:
    shop = Shop()
    report = double_invoke(correct_saga(shop), {"amount": 25}, state=shop.snapshot,
                           reset=shop.reset)
    assert report.ok, str(report)
    assert report.runs == 13  # none, then each of 4 steps in 3 failure modes


def test_a_dict_counter_fails_naming_the_step() -> None:
    shop = Shop()
    report = double_invoke(reserve_counter(shop), {"amount": 25}, state=shop.snapshot,
                           reset=shop.reset)
    assert not report.ok
    problems = {p for v in report.violations for p in v.problems}
    assert any(p.startswith("action of 'reserve' is not idempotent") and "'stock': 9" in p
               and "'stock': 8" in p for p in problems), problems
    assert not any("'charge'" in p for p in problems)


def test_a_refund_that_refunds_twice_is_named() -> None:
    shop = Shop()
    report = double_invoke(refund_not_idempotent(shop), {"amount": 25}, state=shop.snapshot,
                           reset=shop.reset, failures=["ship"])
    with pytest.raises(SafetyError, match="compensation of 'charge' is not idempotent"):
        from sagaway.testing import assert_safe

        assert_safe(report)


def test_compensations_run_for_steps_that_never_ran() -> None:
    shop = Shop()
    order = correct_saga(shop)
    step = order["reserve"]
    step.compensation_fn = None

    @step.compensation
    def release(ctx: StepContext, data: Any, result: Any) -> None:
        shop.stock += 1  # BUG: releases a reservation that may not exist

    report = double_invoke(order, {"amount": 25}, state=shop.snapshot, reset=shop.reset,
                           failures=["reserve"])
    problems = [p for v in report.violations for p in v.problems]
    assert any("compensation of 'reserve' changed the state although its action never ran"
               in p for p in problems), problems


def test_without_state_the_results_are_compared() -> None:
    counter = {"n": 0}
    order = Saga("tickets")

    @order.step(read_only=True)
    def number(ctx: StepContext, data: Any) -> int:
        counter["n"] += 1
        return counter["n"]

    report = double_invoke(order, None, failures=[])
    assert report.ok  # no failure points: nothing run
    report = double_invoke(order, None, failures=["number"])
    assert report.ok  # the failure point fails it before it runs
    report = double_invoke(order, None, failures=None)
    problems = [p for v in report.violations for p in v.problems]
    assert any("action of 'number' is not idempotent" in p and "returned 2 instead of 1" in p
               for p in problems), problems
