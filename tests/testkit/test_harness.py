"""SagaHarness: fakes for local, command and (marker) steps, virtual time, crashes."""

from __future__ import annotations

import time
from typing import Any

import pytest
from testkit_sagas import Shop, correct_saga

from sagaway import DefinitionError, RetryPolicy, Saga, SagaStatus, StepContext
from sagaway.testing import Failure, SagaHarness, Schedule


def kinds(outcome: Any) -> list[str]:
    assert outcome.run is not None
    return [f"{e.kind} {e.step or ''}".strip() for e in outcome.run.history]


def test_a_clean_run_completes_with_no_violations() -> None:
    shop = Shop()
    outcome = SagaHarness(correct_saga(shop)).run({"amount": 25})
    assert outcome.status is SagaStatus.COMPLETED
    assert outcome.ok, outcome.violations
    assert outcome.crashes == 0
    assert [c.step for c in outcome.calls] == ["reserve", "charge", "ship", "email"]
    assert shop.stock == 9 and shop.charged == 25


def test_fails_twice_then_succeeds_backoff_in_virtual_time() -> None:
    order = correct_saga(Shop())
    order["charge"].declared_retry = RetryPolicy(max_attempts=3, initial_backoff=60,
                                                 max_backoff=600, jitter=0)
    harness = SagaHarness(order)
    harness.fake("charge").fails(times=2).returns({"charge_id": "c-1"})
    t0 = time.perf_counter()
    outcome = harness.run({"amount": 25})
    assert time.perf_counter() - t0 < 2
    assert outcome.status is SagaStatus.COMPLETED, outcome.timeline()
    assert outcome.run is not None and outcome.run.results["charge"] == {"charge_id": "c-1"}
    assert [c.outcome for c in outcome.calls if c.step == "charge"] == ["failed", "failed", "ok"]
    # 60 s then 120 s of backoff, without waiting for them.
    assert outcome.virtual_seconds == pytest.approx(180, abs=1)


def test_a_fake_that_always_fails_compensates_the_earlier_fakes() -> None:
    harness = SagaHarness(correct_saga(Shop())).fake_all()
    harness.fake("charge").fails(times=None)
    outcome = harness.run({"amount": 25})
    assert outcome.status is SagaStatus.COMPENSATED
    assert outcome.ok, outcome.violations
    run_id = outcome.run.id if outcome.run else ""
    assert harness.fakes["reserve"].state(run_id) == "compensated"
    assert harness.fakes["charge"].state(run_id) == "untouched"
    assert harness.fakes["ship"].state(run_id) == "untouched"


def test_times_out_is_possibly_applied_and_compensated() -> None:
    harness = SagaHarness(correct_saga(Shop())).fake_all()
    harness.fake("charge").times_out(times=None)
    outcome = harness.run({"amount": 25})
    assert outcome.status is SagaStatus.COMPENSATED
    assert outcome.run is not None
    errors = [e.data["error"] for e in outcome.run.history
              if e.kind == "step.failed" and e.step == "charge" and e.data]
    assert errors == ["timed out after 5s (may have taken effect)"] * 3
    # The step's 5 s timeout, three times, plus backoff: all virtual.
    assert outcome.virtual_seconds >= 15
    # Possibly applied, so compensated (the fake had nothing to undo).
    assert [c.step for c in outcome.calls if c.compensating] == ["charge", "reserve"]


def test_fails_after_effect_applies_once_and_the_retry_gets_the_recorded_result() -> None:
    harness = SagaHarness(correct_saga(Shop())).fake_all()
    charge = harness.fake("charge").fails_after_effect().returns({"charge_id": "c-9"})
    outcome = harness.run({"amount": 25})
    assert outcome.status is SagaStatus.COMPLETED
    assert [c.outcome for c in outcome.calls if c.step == "charge"] == ["effect_lost", "ok"]
    assert list(charge.applied.values()) == [{"charge_id": "c-9"}]
    assert charge.invocations == {f"{outcome.run.id}:charge:action": 2}  # type: ignore[union-attr]


def test_a_failing_compensation_ends_failed_and_that_is_allowed_when_injected() -> None:
    harness = SagaHarness(correct_saga(Shop())).fake_all()
    harness.fake("ship").fails(times=None)
    harness.fake("charge").compensation_fails()
    outcome = harness.run({"amount": 25}, Schedule(failure=Failure("charge",
                                                                   compensation=True)))
    assert outcome.status is SagaStatus.FAILED
    assert outcome.ok, outcome.violations
    # Not injected through the schedule: the invariant flags it.
    bare = harness.run({"amount": 25})
    assert bare.status is SagaStatus.FAILED
    assert any("FAILED although no compensation was made to fail" in v for v in bare.violations)


def test_command_steps_are_faked_without_a_transport() -> None:
    order = Saga("order")
    order.command_step("reserve", service="inventory", command="reserve",
                       compensation="release", timeout=10,
                       compensation_retry=RetryPolicy(max_attempts=7))
    order.command_step("charge", service="payments", timeout=20, pivot=True)
    harness = SagaHarness(order)
    harness.fake("reserve").returns({"reserved": 2})
    harness.fake("charge").times_out(times=None)
    outcome = harness.run({"sku": "x"})
    # The pivot never answered: its outcome is unknown, so the run waits for an operator.
    assert outcome.status is SagaStatus.FAILED
    assert outcome.run is not None and "unknown outcome" in (outcome.run.error or "")
    # Its 20 s timeout (the command step's) was kept: three attempts, each 20 s.
    assert outcome.virtual_seconds >= 60
    # The harness ran a copy; the user's definition is untouched.
    assert order["reserve"].remote and order["charge"].remote
    assert order["reserve"].compensation_retry.max_attempts == 7


def test_step_policies_kinds_and_parallel_groups_are_kept() -> None:
    shop = Shop()
    order = Saga("trip", version=3)

    @order.step(retry=RetryPolicy(max_attempts=5, initial_backoff=1, jitter=0))
    def flight(ctx: StepContext, data: Any) -> None: ...

    @flight.compensation
    def cancel_flight(ctx: StepContext, data: Any, result: Any) -> None: ...

    @order.step
    def hotel(ctx: StepContext, data: Any) -> None: ...

    @hotel.compensation
    def cancel_hotel(ctx: StepContext, data: Any, result: Any) -> None: ...

    order.parallel(flight, hotel)

    @order.step(pivot=True)
    def pay(ctx: StepContext, data: Any) -> None:
        shop.charged += 1

    harness = SagaHarness(order)
    harness.fake("flight").fails(times=None)
    outcome = harness.run({})
    assert outcome.status is SagaStatus.COMPENSATED
    assert outcome.run is not None and outcome.run.version == 3
    assert len([c for c in outcome.calls if c.step == "flight"]) == 5
    # hotel ran alongside flight (same stage), so it was compensated; pay never ran.
    assert [c.step for c in outcome.calls if c.compensating] == ["hotel"]
    assert shop.charged == 0


def test_crash_after_a_transition_recovers_on_a_new_process() -> None:
    shop = Shop()
    harness = SagaHarness(correct_saga(shop))
    outcome = harness.run({"amount": 25}, Schedule(crash_after=2))
    assert outcome.crashes == 1
    assert outcome.status is SagaStatus.COMPLETED
    assert "run.recovered" in kinds(outcome)
    assert {c.generation for c in outcome.calls} == {1, 2}
    # Recovered once the lease (10 virtual seconds) ran out.
    assert 10 <= outcome.virtual_seconds <= 15 + 1
    assert shop.stock == 9 and shop.charged == 25
    assert outcome.ok, outcome.violations


def test_crash_after_an_effect_re_invokes_it_with_the_same_key() -> None:
    shop = Shop()
    harness = SagaHarness(correct_saga(shop))
    outcome = harness.run({"amount": 25}, Schedule(crash_after_effect=2))
    charges = [c for c in outcome.calls if c.step == "charge"]
    assert [c.outcome for c in charges] == ["crashed", "ok"]
    # The keys the step functions were given (ctx.idempotency_key), in both processes.
    assert outcome.run is not None
    assert {c.key for c in charges} == {f"{outcome.run.id}:charge:action"}
    assert [c.generation for c in charges] == [1, 2]
    assert outcome.status is SagaStatus.COMPLETED
    assert shop.charged == 25  # the participant applied it once


def test_the_same_schedule_gives_the_same_timeline() -> None:
    harness = SagaHarness(correct_saga(Shop())).fake_all()
    harness.fake("ship").fails(times=None)
    a = harness.run({"amount": 1}, Schedule(crash_after=4))
    b = harness.run({"amount": 1}, Schedule(crash_after=4))
    assert kinds(a) == kinds(b)
    assert [c.describe() for c in a.calls] == [c.describe() for c in b.calls]


def test_fake_for_an_unknown_step_is_a_clear_error() -> None:
    with pytest.raises(DefinitionError, match=r"no step 'nope'.*reserve, charge, ship, email"):
        SagaHarness(correct_saga(Shop())).fake("nope")


def test_a_harness_rejects_an_invalid_definition() -> None:
    bad = Saga("bad")

    @bad.step
    def reserve(ctx: StepContext, data: Any) -> None: ...

    @bad.step(pivot=True)
    def pay(ctx: StepContext, data: Any) -> None: ...

    with pytest.raises(DefinitionError, match="must be undoable"):
        SagaHarness(bad)


def test_a_run_that_never_ends_is_reported() -> None:
    harness = SagaHarness(correct_saga(Shop()), max_virtual_seconds=3600).fake_all()
    harness.fake("email").fails(times=None)  # after the pivot: retried forever
    outcome = harness.run({"amount": 25})
    assert not outcome.ended
    assert any("did not end" in v for v in outcome.violations)


def test_a_crashed_process_never_acts_again() -> None:
    # Crash at every transition of a compensating run: no call from process 1 comes after
    # a call from process 2, and nothing process 1 committed after its crash (the harness
    # would report it) shows up.
    harness = SagaHarness(correct_saga(Shop())).fake_all()
    harness.fake("ship").fails(times=None)
    clean = harness.run({"amount": 1})
    for k in range(1, clean.transitions + 1):
        outcome = harness.run({"amount": 1}, Schedule(crash_after=k))
        assert outcome.ok, (k, outcome.violations)
        gens = [c.generation for c in outcome.calls]
        assert gens == sorted(gens), (k, [c.describe() for c in outcome.calls])


def test_a_crash_in_the_first_transition_leaves_the_action_to_the_next_process() -> None:
    shop = Shop()
    outcome = SagaHarness(correct_saga(shop)).run({"amount": 25}, Schedule(crash_after=1))
    # "run started, reserve started" was committed, then the process died before reserve
    # ran: process 2 runs it (once), after the lease expired.
    assert [(c.step, c.generation) for c in outcome.calls][:1] == [("reserve", 2)]
    assert outcome.status is SagaStatus.COMPLETED
    assert shop.stock == 9


def test_a_fresh_harness_replays_a_parallel_saga_to_the_same_timeline() -> None:
    def run() -> Any:
        order = Saga("trip")

        @order.step
        def flight(ctx: StepContext, data: Any) -> None: ...

        @flight.compensation
        def unflight(ctx: StepContext, data: Any, result: Any) -> None: ...

        @order.step
        def hotel(ctx: StepContext, data: Any) -> None: ...

        @hotel.compensation
        def unhotel(ctx: StepContext, data: Any, result: Any) -> None: ...

        order.parallel(flight, hotel)
        harness = SagaHarness(order)
        harness.fake("flight").fails(times=None)
        harness.fake("hotel").fails(times=2)
        return harness.run({"who": "ada"}, Schedule(crash_after=3))

    a, b = run(), run()
    assert a.timeline() == b.timeline()
    assert a.run is not None and b.run is not None and a.run.id == b.run.id


def test_two_runs_on_one_harness_are_two_runs() -> None:
    shop = Shop()
    harness = SagaHarness(correct_saga(shop))
    first, second = harness.run({"amount": 25}), harness.run({"amount": 25})
    assert first.run is not None and second.run is not None
    assert first.run.id != second.run.id
    assert shop.stock == 8 and shop.charged == 50
