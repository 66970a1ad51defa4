"""Each invariant flags the ledger that breaks it (ledgers built by hand: the engine itself
never produces these, so this is how each check is shown to be able to fail)."""

from __future__ import annotations

from typing import Any

from sagaway import Saga, SagaRun, SagaStatus, StepContext
from sagaway.testing import Call, Failure, Outcome, Schedule
from sagaway.testing.invariants import violations

RUN = "r1"


def saga() -> Saga:
    s = Saga("order")

    @s.step
    def a(ctx: StepContext, data: Any) -> None: ...

    @a.compensation
    def undo_a(ctx: StepContext, data: Any, result: Any) -> None: ...

    @s.step
    def b(ctx: StepContext, data: Any) -> None: ...

    @b.compensation
    def undo_b(ctx: StepContext, data: Any, result: Any) -> None: ...

    @s.step(pivot=True)
    def c(ctx: StepContext, data: Any) -> None: ...

    s.validate()
    return s


def call(seq: int, step: str, *, comp: bool = False, outcome: Any = "ok", effect: bool = True,
         key: str | None = None) -> Call:
    what = "compensation" if comp else "action"
    return Call(seq, 0.0, 1, RUN, step, comp, 1, key or f"{RUN}:{step}:{what}", "local",
                outcome, effect)


def outcome(status: SagaStatus, calls: list[Call], schedule: Schedule | None = None,
            error: str | None = None, ended: bool = True) -> Outcome:
    run = SagaRun(id=RUN, saga="order", version=1, status=status, input=None, results={},
                  error=error, history=(), created_at=0.0, updated_at=0.0)
    return Outcome(schedule or Schedule(), run, status, calls, 0, 0, 0, 1.0, ended)


def test_a_good_compensated_ledger_has_no_violations() -> None:
    calls = [call(0, "a"), call(1, "b"), call(2, "c", outcome="failed", effect=False),
             call(3, "b", comp=True), call(4, "a", comp=True)]
    assert violations(saga(), outcome(SagaStatus.COMPENSATED, calls)) == []


def test_a_step_that_may_have_applied_must_be_compensated() -> None:
    calls = [call(0, "a"), call(1, "b", outcome="cut"), call(2, "a", comp=True)]
    found = violations(saga(), outcome(SagaStatus.COMPENSATED, calls))
    assert any("b may have taken effect" in v and "never compensated" in v for v in found)


def test_compensations_must_run_in_reverse_order() -> None:
    calls = [call(0, "a"), call(1, "b"), call(2, "a", comp=True), call(3, "b", comp=True)]
    found = violations(saga(), outcome(SagaStatus.COMPENSATED, calls))
    assert any("compensation of a ran before b" in v for v in found)


def test_no_action_after_compensation_began() -> None:
    calls = [call(0, "a"), call(1, "a", comp=True), call(2, "b", outcome="failed",
                                                         effect=False)]
    found = violations(saga(), outcome(SagaStatus.COMPENSATED, calls))
    assert any("action of b ran after compensation began" in v for v in found)


def test_idempotency_keys_must_be_stable() -> None:
    calls = [call(0, "a", outcome="crashed"), call(1, "a", key=f"{RUN}:a:action:2"),
             call(2, "b"), call(3, "c")]
    found = violations(saga(), outcome(SagaStatus.COMPLETED, calls))
    assert any("idempotency key of a action not stable" in v for v in found)


def test_failed_only_when_a_compensation_was_made_to_fail() -> None:
    calls = [call(0, "a"), call(1, "b", outcome="failed", effect=False),
             call(2, "a", comp=True, outcome="failed", effect=False)]
    bad = violations(saga(), outcome(SagaStatus.FAILED, calls, error="compensation gave up"))
    assert any("FAILED although no compensation was made to fail" in v for v in bad)
    allowed = violations(saga(), outcome(SagaStatus.FAILED, calls,
                                         Schedule(failure=Failure("a", compensation=True))))
    assert allowed == []


def test_a_completed_run_runs_no_compensation() -> None:
    calls = [call(0, "a"), call(1, "b"), call(2, "c"), call(3, "a", comp=True)]
    found = violations(saga(), outcome(SagaStatus.COMPLETED, calls))
    assert "the run COMPLETED but compensated a" in found


def test_a_run_must_end() -> None:
    found = violations(saga(), outcome(SagaStatus.RUNNING, [call(0, "a")], ended=False))
    assert found and "did not end" in found[0]


def test_the_fakes_records_are_checked_too() -> None:
    calls = [call(0, "a"), call(1, "b", outcome="failed", effect=False),
             call(2, "a", comp=True)]
    compensated = outcome(SagaStatus.COMPENSATED, calls)
    compensated.fakes = {"a": "applied", "b": "untouched"}
    assert violations(saga(), compensated) == [
        "a: its fake participant still holds the effect in a COMPENSATED run"]
    completed = outcome(SagaStatus.COMPLETED, [call(0, "a"), call(1, "b"), call(2, "c")])
    completed.fakes = {"a": "applied", "b": "compensated", "c": "applied"}
    assert violations(saga(), completed) == [
        "b: its fake participant is compensated in a COMPLETED run"]
