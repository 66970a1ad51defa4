"""The crash explorer: silent on a correct saga, and it catches each classic bug with a
schedule that replays it."""

from __future__ import annotations

from typing import Any

import pytest
from testkit_sagas import (
    Shop,
    consistent,
    correct_saga,
    refund_not_idempotent,
    refund_trusts_result,
)

from sagaway import Saga, SagaStatus, StepContext
from sagaway.testing import (
    Failure,
    SafetyError,
    SagaHarness,
    Schedule,
    assert_safe,
    explore_crashes,
)


def test_a_correct_saga_is_safe_at_every_crash_point() -> None:
    shop = Shop()
    report = explore_crashes(correct_saga(shop), {"amount": 25}, reset=shop.reset,
                             check=consistent(shop))
    print(report.summary())
    assert_safe(report)
    # Every failure point: none, then each of the 4 steps in each of the 3 modes.
    labels = [p.label for p in report.points]
    assert labels[:4] == ["none", "reserve", "reserve times_out",
                          "reserve fails_after_effect"]
    assert len(labels) == 13
    # One crash per durable transition and per effect of each clean run.
    assert report.crash_points == sum(p.transitions + p.effects for p in report.points)
    assert report.runs == report.crash_points + len(report.points)
    none = report.points[0]
    # run.started, four step hand-overs, the end: 5 transitions; 4 effects.
    assert (none.transitions, none.effects) == (5, 4)
    assert none.statuses == {"COMPLETED": none.runs}
    # A charge failure always ends COMPENSATED, whatever the crash.
    charge = next(p for p in report.points if p.label == "charge")
    assert charge.statuses == {"COMPENSATED": charge.runs}


def test_it_catches_a_refund_that_trusts_result_none() -> None:
    shop = Shop()
    report = explore_crashes(refund_trusts_result(shop), {"amount": 25},
                             reset=shop.reset, check=consistent(shop))
    assert not report.ok
    # The card was charged but every answer was lost: the charge is compensated with
    # result=None, and this refund returns without refunding. No crash needed.
    plain = Schedule(failure=Failure("charge", mode="fails_after_effect"))
    (found,) = [v for v in report.violations if v.schedule == plain]
    assert found.problems == ("check: compensated, but stock=10 charged=25",)
    with pytest.raises(SafetyError, match=r"Schedule\(failure=Failure\('charge', "
                                          r"mode='fails_after_effect'\)\)"):
        assert_safe(report)
    # Replaying the schedule shows the same violation again, on the same timeline (to the
    # retry jitter, which derives from the run id: the replay gets the same one).
    before = len(report.violations)
    replayed = report.replay(found.schedule)
    assert replayed.violations == list(found.problems)
    assert replayed.timeline() == list(found.timeline)
    assert len(report.violations) == before  # a replay leaves the report as it was
    assert [c.outcome for c in replayed.calls if c.step == "charge"] == [
        "effect_lost", "effect_lost", "effect_lost", "ok"]


def test_it_catches_a_refund_that_is_not_idempotent() -> None:
    shop = Shop()
    report = explore_crashes(refund_not_idempotent(shop), {"amount": 25},
                             failures=["ship"], reset=shop.reset, check=consistent(shop))
    assert not report.ok
    # Only a crash right after the refund applied (before it was recorded) re-runs it.
    (found,) = report.violations
    assert found.schedule == Schedule(failure="ship", crash_after_effect=3)
    assert found.problems == ("check: compensated, but stock=10 charged=-25",)
    replayed = report.replay(found.schedule)
    assert [c.outcome for c in replayed.calls if c.step == "charge" and c.compensating] == [
        "crashed", "ok"]


def test_a_replayed_schedule_runs_through_the_harness_too() -> None:
    shop = Shop()
    saga = refund_not_idempotent(shop)
    report = explore_crashes(saga, {"amount": 25}, failures=["ship"], reset=shop.reset,
                             check=consistent(shop))
    schedule = report.violations[0].schedule
    shop.reset()
    outcome = SagaHarness(saga).run({"amount": 25}, schedule)
    assert outcome.status is SagaStatus.COMPENSATED
    assert shop.charged == -25


def test_fakes_all_checks_the_definition_alone() -> None:
    order = Saga("order")
    order.command_step("reserve", service="inventory", compensation="release", timeout=10)
    order.command_step("charge", service="payments", compensation="refund", timeout=10)
    order.command_step("ship", service="shipping", timeout=30, pivot=True)
    report = explore_crashes(order, {"sku": "a"}, fakes="all")
    assert_safe(report)
    assert report.failure_points == 10
    # The pivot's outcome made unknown (it timed out, or applied and went silent): FAILED
    # for an operator, by design, and counted apart.
    ship = [p for p in report.points if p.label.startswith("ship ")]
    assert all(p.statuses == {"FAILED": p.runs} for p in ship), ship
    assert report.crash_points > 30


def test_failure_modes_and_compensation_failures_as_failure_points() -> None:
    shop = Shop()
    report = explore_crashes(
        correct_saga(shop), {"amount": 25},
        failures=[Failure("charge", mode="times_out"),
                  Failure("charge", mode="fails_after_effect"),
                  ("ship", Failure("reserve", compensation=True))],
        fakes=["ship", "email"], reset=shop.reset, check=consistent(shop))
    assert_safe(report)
    labels = [p.label for p in report.points]
    assert labels == ["charge times_out", "charge fails_after_effect",
                      "ship + reserve compensation"]
    # The pivot fails, the refund runs, the release keeps failing: FAILED, for an operator,
    # at every crash point (never COMPENSATED with the reservation left, never stuck).
    both = report.points[2]
    assert both.statuses == {"FAILED": both.runs}, both
    outcome = report.replay(Schedule(failure=("ship", Failure("reserve", compensation=True))))
    assert outcome.run is not None and "reserve" in (outcome.run.error or "")
    assert [c.step for c in outcome.calls if c.compensating][:1] == ["charge"]


def test_unknown_failure_point_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no such step"):
        explore_crashes(correct_saga(Shop()), {"amount": 1}, failures=["nope"])


def test_a_step_without_a_compensation_that_took_effect_is_reported() -> None:
    # A read_only step is trusted to change nothing; one that does is caught by check.
    shop = Shop()
    order = Saga("order")

    @order.step(read_only=True)
    def look(ctx: StepContext, data: Any) -> None:
        shop.stock -= 1  # BUG: says read-only, is not

    @order.step
    def pay(ctx: StepContext, data: Any) -> None:
        raise RuntimeError("declined")

    @pay.compensation
    def unpay(ctx: StepContext, data: Any, result: Any) -> None: ...

    def check(outcome: Any) -> None:
        assert shop.stock == 10, f"stock {shop.stock}"

    report = explore_crashes(order, None, failures=[], reset=shop.reset, check=check)
    assert report.failure_points == 0
    report = explore_crashes(order, None, failures=["pay"], reset=shop.reset, check=check)
    assert not report.ok and "stock 9" in report.violations[0].problems[0]


def test_explorer_speed(capsys: pytest.CaptureFixture[str]) -> None:
    shop = Shop()
    report = explore_crashes(correct_saga(shop), {"amount": 25}, reset=shop.reset)
    with capsys.disabled():
        print(f"\n{report.summary()}")
    assert report.crash_points_per_second > 50


def test_schedule_repr_is_code() -> None:
    s = Schedule(failure="charge", crash_after=5)
    assert repr(s) == "Schedule(failure='charge', crash_after=5)"
    t = Schedule(failure=Failure("charge", mode="times_out"), crash_after_effect=2)
    assert repr(t) == ("Schedule(failure=Failure('charge', mode='times_out'), "
                       "crash_after_effect=2)")
    assert eval(repr(t)) == t
    both = Schedule(failure=("ship", Failure("reserve", compensation=True)), crash_after=3)
    assert repr(both) == ("Schedule(failure=('ship', Failure('reserve', compensation=True)), "
                          "crash_after=3)")
    assert eval(repr(both)) == both
    assert Schedule(failure=("ship",)) == Schedule(failure="ship")
    assert Schedule(failure=()) == Schedule()


def shaped(shape: str) -> Saga:
    """A saga from a shape like "c,cc,p,r": stages by commas; c compensatable, o read-only,
    p pivot, r retriable (after the pivot)."""
    saga = Saga("shape-" + shape.replace(",", "."))
    n = 0
    for stage in shape.split(","):
        steps = []
        for kind in stage:
            n += 1

            def act(ctx: StepContext, data: Any) -> None: ...

            step = saga.step(name=f"s{n}{kind}", timeout=5, pivot=kind == "p",
                             retriable=kind == "r", read_only=kind == "o")(act)
            if kind == "c":
                step.compensation(lambda ctx, data, result: None)
            steps.append(step)
        if len(steps) > 1:
            saga.parallel(*steps)
    return saga


@pytest.mark.parametrize("shape", ["c,cc,p,r", "o,co,p", "ccc,c,p,rr"])
def test_the_engine_keeps_its_promises_for_saga_shapes(shape: str) -> None:
    saga = shaped(shape)
    report = explore_crashes(saga, {}, fakes="all")
    assert_safe(report)
    # And with each compensation failing after the pivot failed: FAILED, for an operator.
    pivot = next(s.name for s in saga.steps if s.pivot)
    points = [(pivot, Failure(s.name, compensation=True))
              for s in saga.steps if s.compensation_fn is not None]
    failing = explore_crashes(saga, {}, fakes="all", failures=points)
    assert_safe(failing)
    assert all(set(p.statuses) == {"FAILED"} for p in failing.points), str(failing)
