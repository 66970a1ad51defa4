"""The decider: every status transition, illegal events, purity, and a seeded explorer.

Each test drives a run through ``Run.apply``, which also checks, on every single decision,
that ``decide`` did not touch its input, gives the same answer twice, stamps its history
with the event's time, and produces a state that survives the JSON round trip the store
puts it through.
"""

from __future__ import annotations

import copy
import json
import random
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from sagaway import HistoryEntry, RetryPolicy, Saga, SagaStatus, StepContext, StepKind
from sagaway.definition.retry import DEFAULT_ACTION_RETRY
from sagaway.engine.decider import INTERRUPTED, Decision, decide
from sagaway.engine.state import (
    ActionFailed,
    ActionSucceeded,
    Command,
    CompensationFailed,
    CompensationSucceeded,
    Event,
    InvokeAction,
    InvokeCompensation,
    Recover,
    RunState,
    Start,
    StepState,
    StepStatus,
    TimerFired,
)

RUN_ID = "run-1"

# Exact, jitter-free policies so wake-up times can be asserted to the digit.
FAST = RetryPolicy(
    max_attempts=3, initial_backoff=1.0, multiplier=2.0, max_backoff=10.0, jitter=0.0
)
ONCE = RetryPolicy(max_attempts=1)


def act(ctx: StepContext, data: Any) -> None:
    return None


def undo(ctx: StepContext, data: Any, result: Any) -> None:
    return None


def make_saga(
    *specs: str | tuple[str, dict[str, Any]],
    parallel: Sequence[Sequence[str]] = (),
    compensation_retry: RetryPolicy | None = None,
) -> Saga:
    """Build a validated saga from ``name`` or ``(name, options)`` specs.

    Steps before the pivot that are not read_only get a compensation; ``retry`` defaults
    to FAST so that delays are exact.
    """
    saga = Saga("orders")
    after_pivot = False
    for spec in specs:
        name, options = (spec, {}) if isinstance(spec, str) else spec
        options = {"retry": FAST, **options}
        step = saga.step(name=name, **options)(act)
        if not (
            after_pivot
            or options.get("pivot")
            or options.get("read_only")
            or options.get("retriable")
        ):
            step.compensation(retry=compensation_retry or FAST)(undo)
        after_pivot = after_pivot or bool(options.get("pivot"))
    for group in parallel:
        saga.parallel(*(saga[n] for n in group))
    saga.validate()
    return saga


class Run:
    """A run driven event by event, checking the decider's contract on every decision."""

    def __init__(self, saga: Saga, run_id: str = RUN_ID) -> None:
        self.saga = saga
        self.run_id = run_id
        self.state = RunState()
        self.history: list[HistoryEntry] = []
        self.commands: list[Command] = []

    def apply(self, event: Event) -> Decision:
        before = copy.deepcopy(self.state)
        decision = decide(self.saga, self.run_id, self.state, event)
        assert self.state == before, "decide() mutated its input state"
        again = decide(self.saga, self.run_id, copy.deepcopy(before), event)
        assert again == decision, "decide() is not deterministic"
        assert decision.state is not self.state
        assert all(h.at == event.now for h in decision.history)
        as_json = json.loads(json.dumps(decision.state.to_json(), allow_nan=False))
        assert RunState.from_json(as_json) == decision.state
        self.state = decision.state
        self.history += decision.history
        self.commands += decision.commands
        return decision

    def step(self, name: str) -> StepState:
        return self.state.steps[name]

    @property
    def status(self) -> SagaStatus:
        return self.state.status


def kinds(decision: Decision | Sequence[HistoryEntry]) -> list[str]:
    entries = decision.history if isinstance(decision, Decision) else decision
    return [h.kind for h in entries]


def entries(decision: Decision) -> list[tuple[str, str | None, int | None]]:
    return [(h.kind, h.step, h.attempt) for h in decision.history]


def started(saga: Saga) -> Run:
    run = Run(saga)
    run.apply(Start(10.0))
    return run


def succeed(run: Run, *names: str, now: float = 20.0) -> None:
    """Let the current attempt of each named step succeed with a result named after it."""
    for name in names:
        run.apply(ActionSucceeded(name, run.step(name).attempts, f"{name}-result", now))


LINEAR = ("reserve", "charge", "ship")


# == PENDING → RUNNING ===================================================================


def test_start_runs_the_first_step() -> None:
    run = Run(make_saga(*LINEAR))
    d = run.apply(Start(10.0))
    assert run.status is SagaStatus.RUNNING
    assert run.state.stage == 0
    assert d.commands == [InvokeAction("reserve", 1)]
    assert d.history == [
        HistoryEntry(10.0, "run.started", data={"saga": "orders", "version": 1}),
        HistoryEntry(10.0, "step.started", "reserve", 1),
    ]
    assert run.state.steps == {"reserve": StepState(StepStatus.RUNNING, attempts=1)}
    assert d.changed


def test_start_of_a_parallel_first_stage_runs_all_its_steps() -> None:
    run = Run(make_saga("a", "b", "c", parallel=[("a", "b")]))
    d = run.apply(Start(1.0))
    assert d.commands == [InvokeAction("a", 1), InvokeAction("b", 1)]
    assert kinds(d) == ["run.started", "step.started", "step.started"]


# == RUNNING → COMPLETED =================================================================


def test_steps_run_in_order_and_the_run_completes() -> None:
    run = started(make_saga(*LINEAR))
    d = run.apply(ActionSucceeded("reserve", 1, {"id": "r-1"}, 11.0))
    assert d.commands == [InvokeAction("charge", 1)]
    assert entries(d) == [("step.succeeded", "reserve", 1), ("step.started", "charge", 1)]
    assert run.state.stage == 1
    assert run.step("reserve") == StepState(
        StepStatus.SUCCEEDED, attempts=1, maybe_applied=True, result={"id": "r-1"}, succeeded=True
    )
    d = run.apply(ActionSucceeded("charge", 1, 42, 12.0))
    assert d.commands == [InvokeAction("ship", 1)]
    assert run.state.stage == 2
    d = run.apply(ActionSucceeded("ship", 1, None, 13.0))
    assert d.commands == []
    assert d.history == [
        HistoryEntry(13.0, "step.succeeded", "ship", 1),
        HistoryEntry(13.0, "run.finished", data={"status": "COMPLETED"}),
    ]
    assert run.status is SagaStatus.COMPLETED
    assert run.state.error is None
    assert run.state.results == {"reserve": {"id": "r-1"}, "charge": 42, "ship": None}
    assert kinds(run.history) == [
        "run.started",
        "step.started",
        "step.succeeded",
        "step.started",
        "step.succeeded",
        "step.started",
        "step.succeeded",
        "run.finished",
    ]
    assert run.commands == [InvokeAction(n, 1) for n in LINEAR]


def test_single_step_saga_completes() -> None:
    run = started(make_saga("only"))
    d = run.apply(ActionSucceeded("only", 1, "ok", 11.0))
    assert kinds(d) == ["step.succeeded", "run.finished"]
    assert run.status is SagaStatus.COMPLETED


def test_saga_with_pivot_and_retriable_steps_completes() -> None:
    saga = make_saga("reserve", ("check", {"read_only": True}), ("charge", {"pivot": True}), "ship")
    run = started(saga)
    succeed(run, "reserve", "check", "charge", "ship")
    assert run.status is SagaStatus.COMPLETED
    assert [c for c in run.commands if isinstance(c, InvokeCompensation)] == []


# == retries =============================================================================


def test_failed_attempt_schedules_a_retry() -> None:
    run = started(make_saga(*LINEAR))
    succeed(run, "reserve", now=11.0)
    d = run.apply(ActionFailed("charge", 1, "card declined: try later", 12.0))
    assert d.commands == []
    assert d.history == [
        HistoryEntry(
            12.0,
            "step.failed",
            "charge",
            1,
            {"error": "card declined: try later", "retryable": True},
        ),
        HistoryEntry(12.0, "step.retry_scheduled", "charge", 2, {"delay": 1.0}),
    ]
    assert run.status is SagaStatus.RUNNING
    assert run.step("charge") == StepState(
        StepStatus.WAITING, attempts=1, error="card declined: try later", wake_at=13.0
    )
    assert run.state.wake_at == 13.0


def test_timer_before_the_wake_time_does_nothing() -> None:
    run = started(make_saga(*LINEAR))
    run.apply(ActionFailed("reserve", 1, "busy", 12.0))
    before = copy.deepcopy(run.state)
    d = run.apply(TimerFired(12.999))
    assert (d.history, d.commands, d.state) == ([], [], before)
    assert not d.changed


def test_timer_starts_the_next_attempt() -> None:
    run = started(make_saga(*LINEAR))
    run.apply(ActionFailed("reserve", 1, "busy", 12.0))
    d = run.apply(TimerFired(13.0))
    assert d.commands == [InvokeAction("reserve", 2)]
    assert d.history == [HistoryEntry(13.0, "step.started", "reserve", 2)]
    assert run.step("reserve").status is StepStatus.RUNNING
    assert run.step("reserve").attempts == 2
    assert run.step("reserve").wake_at is None
    assert run.state.wake_at is None
    # The retry succeeds: the error of the failed attempt is cleared.
    run.apply(ActionSucceeded("reserve", 2, "r", 14.0))
    assert run.step("reserve") == StepState(
        StepStatus.SUCCEEDED, attempts=2, maybe_applied=True, result="r", succeeded=True
    )


def test_backoff_grows_between_attempts_then_the_step_gives_up() -> None:
    run = started(make_saga(*LINEAR))
    succeed(run, "reserve", now=11.0)
    run.apply(ActionFailed("charge", 1, "e1", 20.0))
    assert run.step("charge").wake_at == 21.0
    run.apply(TimerFired(21.0))
    d = run.apply(ActionFailed("charge", 2, "e2", 22.0))
    assert d.history[-1] == HistoryEntry(22.0, "step.retry_scheduled", "charge", 3, {"delay": 2.0})
    assert run.step("charge").wake_at == 24.0
    run.apply(TimerFired(24.5))
    d = run.apply(ActionFailed("charge", 3, "e3", 25.0))
    assert entries(d) == [
        ("step.failed", "charge", 3),
        ("step.gave_up", "charge", 3),
        ("run.compensating", None, None),
        ("compensation.started", "reserve", 1),
    ]
    assert d.history[1].data == {"error": "e3"}
    assert d.commands == [InvokeCompensation("reserve", 1)]
    assert run.status is SagaStatus.COMPENSATING
    assert run.state.error == "step 'charge' failed: e3"
    assert run.step("charge").status is StepStatus.FAILED
    assert [c for c in run.commands if c == InvokeAction("charge", 4)] == []


def test_retry_delay_is_jittered_by_the_idempotency_key() -> None:
    saga = make_saga(("reserve", {"retry": DEFAULT_ACTION_RETRY}), "charge")
    expected = DEFAULT_ACTION_RETRY.delay(1, "run-1:reserve:action")
    assert 0.09 <= expected <= 0.1
    run = started(saga)
    d = run.apply(ActionFailed("reserve", 1, "busy", 100.0))
    assert run.step("reserve").wake_at == 100.0 + expected
    assert d.history[-1].data == {"delay": round(expected, 6)}
    # Another run of the same saga waits a different (but just as reproducible) time.
    other = Run(saga, "run-2")
    other.apply(Start(10.0))
    other.apply(ActionFailed("reserve", 1, "busy", 100.0))
    assert other.step("reserve").wake_at == 100.0 + DEFAULT_ACTION_RETRY.delay(
        1, "run-2:reserve:action"
    )
    assert other.step("reserve").wake_at != run.step("reserve").wake_at


def test_single_attempt_policy_gives_up_at_once() -> None:
    run = started(make_saga("reserve", ("charge", {"retry": ONCE})))
    succeed(run, "reserve")
    d = run.apply(ActionFailed("charge", 1, "nope", 30.0, retryable=True))
    assert kinds(d) == ["step.failed", "step.gave_up", "run.compensating", "compensation.started"]


# == non-retryable failure ================================================================


def test_non_retryable_failure_gives_up_without_retrying() -> None:
    run = started(make_saga(*LINEAR))
    succeed(run, "reserve")
    d = run.apply(ActionFailed("charge", 1, "card stolen", 30.0, retryable=False))
    assert d.history[:2] == [
        HistoryEntry(
            30.0, "step.failed", "charge", 1, {"error": "card stolen", "retryable": False}
        ),
        HistoryEntry(30.0, "step.gave_up", "charge", 1, {"error": "card stolen"}),
    ]
    assert d.commands == [InvokeCompensation("reserve", 1)]
    assert run.step("charge") == StepState(StepStatus.FAILED, attempts=1, error="card stolen")


def test_first_step_failing_cleanly_compensates_nothing() -> None:
    run = started(make_saga(*LINEAR))
    d = run.apply(ActionFailed("reserve", 1, "out of stock", 11.0, retryable=False))
    assert d.commands == []
    assert kinds(d) == ["step.failed", "step.gave_up", "run.compensating", "run.finished"]
    assert d.history[2].data == {"reason": "step 'reserve' failed: out of stock"}
    assert d.history[3].data == {"status": "COMPENSATED"}
    assert run.status is SagaStatus.COMPENSATED
    assert run.state.error == "step 'reserve' failed: out of stock"


# == RUNNING → COMPENSATING → COMPENSATED ================================================


def test_compensation_runs_in_reverse_and_ends_compensated() -> None:
    run = started(make_saga("reserve", "charge", "ship", "notify"))
    succeed(run, "reserve", "charge")
    d = run.apply(ActionFailed("ship", 1, "no courier", 30.0, retryable=False))
    assert d.history[2:] == [
        HistoryEntry(30.0, "run.compensating", data={"reason": "step 'ship' failed: no courier"}),
        HistoryEntry(30.0, "compensation.started", "charge", 1),
    ]
    assert d.commands == [InvokeCompensation("charge", 1)]
    assert run.state.stage == 1
    assert run.step("charge").status is StepStatus.COMPENSATING
    assert run.step("charge").compensation_attempts == 1

    d = run.apply(CompensationSucceeded("charge", 1, 31.0))
    assert entries(d) == [
        ("compensation.succeeded", "charge", 1),
        ("compensation.started", "reserve", 1),
    ]
    assert d.commands == [InvokeCompensation("reserve", 1)]
    assert run.state.stage == 0
    assert run.step("charge").status is StepStatus.COMPENSATED

    d = run.apply(CompensationSucceeded("reserve", 1, 32.0))
    assert d.history == [
        HistoryEntry(32.0, "compensation.succeeded", "reserve", 1),
        HistoryEntry(32.0, "run.finished", data={"status": "COMPENSATED"}),
    ]
    assert d.commands == []
    assert run.status is SagaStatus.COMPENSATED
    assert run.state.error == "step 'ship' failed: no courier"
    # ship failed without taking effect and notify never ran: neither is compensated.
    assert run.step("ship").status is StepStatus.FAILED
    assert "notify" not in run.state.steps
    assert [c for c in run.commands if isinstance(c, InvokeCompensation)] == [
        InvokeCompensation("charge", 1),
        InvokeCompensation("reserve", 1),
    ]


def test_compensation_retries_by_its_own_policy() -> None:
    run = started(make_saga("reserve", "charge"))
    succeed(run, "reserve")
    run.apply(ActionFailed("charge", 1, "no", 30.0, retryable=False))
    d = run.apply(CompensationFailed("reserve", 1, "db down", 31.0))
    assert d.history == [
        HistoryEntry(
            31.0, "compensation.failed", "reserve", 1, {"error": "db down", "retryable": True}
        ),
        HistoryEntry(31.0, "compensation.retry_scheduled", "reserve", 2, {"delay": 1.0}),
    ]
    assert d.commands == []
    assert run.step("reserve").status is StepStatus.COMPENSATION_WAITING
    assert run.step("reserve").wake_at == 32.0
    assert run.state.wake_at == 32.0
    assert run.status is SagaStatus.COMPENSATING
    assert run.apply(TimerFired(31.5)).history == []
    d = run.apply(TimerFired(32.0))
    assert d.commands == [InvokeCompensation("reserve", 2)]
    assert d.history == [HistoryEntry(32.0, "compensation.started", "reserve", 2)]
    assert run.step("reserve").wake_at is None
    d = run.apply(CompensationSucceeded("reserve", 2, 33.0))
    assert kinds(d) == ["compensation.succeeded", "run.finished"]
    assert run.status is SagaStatus.COMPENSATED


def test_compensation_delay_is_jittered_by_the_compensation_key() -> None:
    policy = RetryPolicy(max_attempts=5, initial_backoff=4.0, jitter=0.5)
    run = started(make_saga("reserve", "charge", compensation_retry=policy))
    succeed(run, "reserve")
    run.apply(ActionFailed("charge", 1, "no", 30.0, retryable=False))
    run.apply(CompensationFailed("reserve", 1, "db down", 31.0))
    assert run.step("reserve").wake_at == 31.0 + policy.delay(1, "run-1:reserve:compensation")


# == COMPENSATING → FAILED ================================================================


def test_exhausted_compensation_ends_the_run_failed() -> None:
    run = started(
        make_saga(
            "reserve",
            "charge",
            "ship",
            compensation_retry=RetryPolicy(max_attempts=2, jitter=0.0, initial_backoff=1.0),
        )
    )
    succeed(run, "reserve", "charge")
    run.apply(ActionFailed("ship", 1, "no", 30.0, retryable=False))
    run.apply(CompensationFailed("charge", 1, "refund api down", 31.0))
    run.apply(TimerFired(32.0))
    d = run.apply(CompensationFailed("charge", 2, "refund api down", 33.0))
    error = "compensation of step 'charge' failed after 2 attempts: refund api down"
    assert d.history == [
        HistoryEntry(
            33.0,
            "compensation.failed",
            "charge",
            2,
            {"error": "refund api down", "retryable": True},
        ),
        HistoryEntry(33.0, "compensation.gave_up", "charge", 2, {"error": "refund api down"}),
        HistoryEntry(33.0, "run.finished", data={"status": "FAILED", "error": error}),
    ]
    assert d.commands == []
    assert run.status is SagaStatus.FAILED
    assert run.state.error == error
    # The earlier step is left as it is, for the operator: not compensated behind their back.
    assert run.step("reserve").status is StepStatus.SUCCEEDED
    assert run.state.wake_at is None


def test_non_retryable_compensation_failure_ends_the_run_failed_at_once() -> None:
    run = started(make_saga("reserve", "charge"))
    succeed(run, "reserve")
    run.apply(ActionFailed("charge", 1, "no", 30.0, retryable=False))
    d = run.apply(CompensationFailed("reserve", 1, "reservation unknown", 31.0, retryable=False))
    assert kinds(d) == ["compensation.failed", "compensation.gave_up", "run.finished"]
    assert run.status is SagaStatus.FAILED
    assert run.state.error == (
        "compensation of step 'reserve' failed after 1 attempts: reservation unknown"
    )


def test_results_keep_a_succeeded_step_while_its_compensation_retries() -> None:
    run = started(make_saga("reserve", "charge"))
    run.apply(ActionSucceeded("reserve", 1, {"reservation": "r-9"}, 11.0))
    run.apply(ActionFailed("charge", 1, "no", 30.0, retryable=False))
    run.apply(CompensationFailed("reserve", 1, "db down", 31.0))
    assert run.state.results == {"reserve": {"reservation": "r-9"}}


def test_results_never_list_a_step_that_failed() -> None:
    run = started(make_saga("reserve", "charge"))
    succeed(run, "reserve")
    for attempt, now in ((1, 30.0), (2, 40.0), (3, 50.0)):
        if attempt > 1:
            run.apply(TimerFired(now))
        run.apply(ActionFailed("charge", attempt, "timed out", now + 1, maybe_applied=True))
    run.apply(CompensationSucceeded("charge", 1, 60.0))
    run.apply(CompensationSucceeded("reserve", 1, 61.0))
    assert run.status is SagaStatus.COMPENSATED
    assert run.state.results == {"reserve": "reserve-result"}


# == timeouts: outcome unknown ===========================================================


def test_timed_out_attempt_is_retried_and_marked_maybe_applied() -> None:
    run = started(make_saga(*LINEAR))
    d = run.apply(ActionFailed("reserve", 1, "timed out after 2s", 11.0, maybe_applied=True))
    assert d.history == [
        HistoryEntry(
            11.0,
            "step.failed",
            "reserve",
            1,
            {"error": "timed out after 2s", "retryable": True, "maybe_applied": True},
        ),
        HistoryEntry(11.0, "step.retry_scheduled", "reserve", 2, {"delay": 1.0}),
    ]
    assert run.step("reserve").maybe_applied
    assert run.step("reserve").status is StepStatus.WAITING
    run.apply(TimerFired(12.0))
    run.apply(ActionSucceeded("reserve", 2, "r", 13.0))
    assert run.step("reserve").status is StepStatus.SUCCEEDED


def test_timed_out_step_that_gives_up_is_itself_compensated_first() -> None:
    run = started(make_saga(*LINEAR))
    succeed(run, "reserve")
    run.apply(ActionFailed("charge", 1, "timed out", 30.0, maybe_applied=True))
    run.apply(TimerFired(31.0))
    run.apply(ActionFailed("charge", 2, "timed out", 32.0, maybe_applied=True))
    run.apply(TimerFired(34.0))
    d = run.apply(ActionFailed("charge", 3, "timed out", 35.0, maybe_applied=True))
    assert d.history[1] == HistoryEntry(
        35.0, "step.gave_up", "charge", 3, {"error": "timed out", "maybe_applied": True}
    )
    assert d.commands == [InvokeCompensation("charge", 1)]
    assert run.state.stage == 1
    run.apply(CompensationSucceeded("charge", 1, 36.0))
    assert run.commands[-1] == InvokeCompensation("reserve", 1)
    run.apply(CompensationSucceeded("reserve", 1, 37.0))
    assert run.status is SagaStatus.COMPENSATED
    assert run.step("charge").status is StepStatus.COMPENSATED


def test_maybe_applied_sticks_when_a_later_attempt_fails_cleanly() -> None:
    run = started(make_saga(*LINEAR))
    succeed(run, "reserve")
    run.apply(ActionFailed("charge", 1, "timed out", 30.0, maybe_applied=True))
    run.apply(TimerFired(31.0))
    d = run.apply(ActionFailed("charge", 2, "declined", 32.0, retryable=False))
    assert d.history[1] == HistoryEntry(
        32.0, "step.gave_up", "charge", 2, {"error": "declined", "maybe_applied": True}
    )
    assert d.commands == [InvokeCompensation("charge", 1)]


def test_non_retryable_with_unknown_outcome_is_compensated() -> None:
    # e.g. the action ran but its result could not be encoded: it gave up, maybe applied.
    run = started(make_saga(*LINEAR))
    d = run.apply(
        ActionFailed("reserve", 1, "result too large", 11.0, retryable=False, maybe_applied=True)
    )
    assert d.commands == [InvokeCompensation("reserve", 1)]
    run.apply(CompensationSucceeded("reserve", 1, 12.0))
    assert run.status is SagaStatus.COMPENSATED


# == pivot and retriable steps: RUNNING → FAILED ==========================================

PIVOTED = (
    "reserve",
    ("charge", {"pivot": True}),
    ("ship", {"retry": None}),
    ("notify", {"retriable": True, "retry": RetryPolicy(max_attempts=2, jitter=0.0)}),
)


def test_pivot_that_fails_cleanly_compensates_the_steps_before_it() -> None:
    run = started(make_saga(*PIVOTED))
    succeed(run, "reserve")
    d = run.apply(ActionFailed("charge", 1, "declined", 30.0, retryable=False))
    assert d.commands == [InvokeCompensation("reserve", 1)]
    assert run.status is SagaStatus.COMPENSATING
    run.apply(CompensationSucceeded("reserve", 1, 31.0))
    assert run.status is SagaStatus.COMPENSATED
    assert run.step("charge").status is StepStatus.FAILED


def test_pivot_giving_up_with_unknown_outcome_fails_the_run() -> None:
    run = started(make_saga(*PIVOTED))
    succeed(run, "reserve")
    run.apply(ActionFailed("charge", 1, "timed out", 30.0, maybe_applied=True))
    run.apply(TimerFired(31.0))
    run.apply(ActionFailed("charge", 2, "503", 32.0))
    run.apply(TimerFired(34.0))
    d = run.apply(ActionFailed("charge", 3, "503", 35.0))
    error = (
        "the pivot 'charge' gave up with an unknown outcome (503); it may have taken "
        "effect, so neither finishing nor compensating is safe without an operator"
    )
    assert d.history == [
        HistoryEntry(35.0, "step.failed", "charge", 3, {"error": "503", "retryable": True}),
        HistoryEntry(35.0, "step.gave_up", "charge", 3, {"error": "503", "maybe_applied": True}),
        HistoryEntry(35.0, "run.finished", data={"status": "FAILED", "error": error}),
    ]
    assert d.commands == []
    assert run.status is SagaStatus.FAILED
    assert run.state.error == error
    assert run.step("reserve").status is StepStatus.SUCCEEDED
    assert not any(isinstance(c, InvokeCompensation) for c in run.commands)


def test_retriable_step_exhausting_a_finite_policy_fails_the_run() -> None:
    run = started(make_saga(*PIVOTED))
    succeed(run, "reserve", "charge", "ship")
    run.apply(ActionFailed("notify", 1, "smtp down", 40.0))
    assert run.state.wake_at is not None
    run.apply(TimerFired(run.state.wake_at))
    d = run.apply(ActionFailed("notify", 2, "smtp down", 41.0))
    error = (
        "step 'notify' comes after the pivot and gave up after 2 "
        "attempt(s) (smtp down); the saga cannot compensate past its pivot, so it needs an "
        "operator"
    )
    assert kinds(d) == ["step.failed", "step.gave_up", "run.finished"]
    assert d.history[-1].data == {"status": "FAILED", "error": error}
    assert d.commands == []
    assert run.status is SagaStatus.FAILED
    assert not any(isinstance(c, InvokeCompensation) for c in run.commands)


def test_non_retryable_failure_after_the_pivot_fails_without_compensating() -> None:
    run = started(make_saga(*PIVOTED))
    succeed(run, "reserve", "charge")
    d = run.apply(ActionFailed("ship", 1, "address invalid", 40.0, retryable=False))
    assert kinds(d) == ["step.failed", "step.gave_up", "run.finished"]
    assert run.status is SagaStatus.FAILED
    assert run.state.error is not None
    assert run.state.error.startswith("step 'ship' comes after the pivot")


def test_step_after_the_pivot_retries_without_limit_by_default() -> None:
    saga = make_saga(*PIVOTED)
    assert saga["ship"].kind is StepKind.RETRIABLE
    assert saga["ship"].retry.max_attempts is None
    run = started(saga)
    succeed(run, "reserve", "charge")
    now = 100.0
    for attempt in range(1, 41):
        d = run.apply(ActionFailed("ship", attempt, "courier api down", now))
        assert kinds(d) == ["step.failed", "step.retry_scheduled"]
        wake = run.step("ship").wake_at
        assert wake is not None
        wait = wake - now
        assert 0 < wait <= 30.0
        now = wake
        assert run.apply(TimerFired(now)).commands == [InvokeAction("ship", attempt + 1)]
    assert run.status is SagaStatus.RUNNING
    assert wait >= 27.0  # jitter is 10 %: by now the wait sits at the 30 s cap
    succeed(run, "ship", "notify")
    assert run.status is SagaStatus.COMPLETED


# == read-only steps and steps that never ran =============================================


def test_read_only_steps_are_not_compensated() -> None:
    run = started(make_saga("reserve", ("check", {"read_only": True}), "charge"))
    succeed(run, "reserve", "check")
    d = run.apply(ActionFailed("charge", 1, "declined", 30.0, retryable=False))
    assert d.commands == [InvokeCompensation("reserve", 1)]
    run.apply(CompensationSucceeded("reserve", 1, 31.0))
    assert run.status is SagaStatus.COMPENSATED
    assert run.step("check").status is StepStatus.SUCCEEDED
    assert run.step("check").compensation_attempts == 0


def test_steps_that_never_ran_or_failed_cleanly_are_not_compensated() -> None:
    run = started(make_saga("a", "b", "c", "d"))
    succeed(run, "a")
    run.apply(ActionFailed("b", 1, "e", 30.0))  # clean failure, retried ...
    run.apply(TimerFired(31.0))
    run.apply(ActionFailed("b", 2, "e", 32.0, retryable=False))  # ... then gives up
    run.apply(CompensationSucceeded("a", 1, 33.0))
    assert run.status is SagaStatus.COMPENSATED
    assert set(run.state.steps) == {"a", "b"}
    assert [c for c in run.commands if isinstance(c, InvokeCompensation)] == [
        InvokeCompensation("a", 1)
    ]


# == parallel stages ======================================================================

PARALLEL = make_saga("a", "b", "c", "d", "e", parallel=[("b", "c", "d")])


def test_parallel_stage_starts_together_and_waits_for_all() -> None:
    run = started(PARALLEL)
    d = run.apply(ActionSucceeded("a", 1, None, 11.0))
    assert d.commands == [InvokeAction("b", 1), InvokeAction("c", 1), InvokeAction("d", 1)]
    assert run.state.stage == 1
    assert run.apply(ActionSucceeded("c", 1, None, 12.0)).commands == []
    assert run.apply(ActionSucceeded("b", 1, None, 13.0)).commands == []
    d = run.apply(ActionSucceeded("d", 1, None, 14.0))
    assert d.commands == [InvokeAction("e", 1)]
    assert run.state.stage == 2


def test_parallel_step_retry_does_not_hold_back_its_siblings() -> None:
    run = started(PARALLEL)
    succeed(run, "a", now=11.0)
    run.apply(ActionFailed("c", 1, "busy", 12.0))
    succeed(run, "b", "d", now=12.5)
    assert run.status is SagaStatus.RUNNING
    assert run.commands[-1] == InvokeAction("d", 1)
    assert run.apply(TimerFired(13.0)).commands == [InvokeAction("c", 2)]
    d = run.apply(ActionSucceeded("c", 2, None, 14.0))
    assert d.commands == [InvokeAction("e", 1)]


def test_parallel_failure_waits_for_running_siblings_then_compensates_what_took_effect() -> None:
    run = started(PARALLEL)
    succeed(run, "a", now=11.0)
    d = run.apply(ActionFailed("b", 1, "rejected", 12.0, retryable=False))
    # c and d are still in flight: they may take effect, so nothing is undone yet.
    assert kinds(d) == ["step.failed", "step.gave_up", "run.compensating"]
    assert d.commands == []
    assert run.status is SagaStatus.COMPENSATING

    d = run.apply(ActionSucceeded("c", 1, "c-result", 13.0))
    assert entries(d) == [("step.succeeded", "c", 1)]
    assert d.commands == []

    # d times out: it gets no retry while the run compensates, and may have taken effect.
    d = run.apply(ActionFailed("d", 1, "timed out", 14.0, maybe_applied=True))
    assert entries(d) == [
        ("step.failed", "d", 1),
        ("step.gave_up", "d", 1),
        ("compensation.started", "c", 1),
        ("compensation.started", "d", 1),
    ]
    assert d.commands == [InvokeCompensation("c", 1), InvokeCompensation("d", 1)]
    assert run.state.stage == 1

    assert run.apply(CompensationSucceeded("d", 1, 15.0)).commands == []
    d = run.apply(CompensationSucceeded("c", 1, 16.0))
    assert d.commands == [InvokeCompensation("a", 1)]
    assert run.state.stage == 0
    d = run.apply(CompensationSucceeded("a", 1, 17.0))
    assert kinds(d) == ["compensation.succeeded", "run.finished"]
    assert run.status is SagaStatus.COMPENSATED
    assert run.step("b").status is StepStatus.FAILED  # failed cleanly: nothing to undo
    assert "e" not in run.state.steps


def test_retry_after_stretches_the_wait_within_the_policy_cap() -> None:
    policy = RetryPolicy(max_attempts=5, initial_backoff=0.5, max_backoff=4.0, jitter=0)
    saga = make_saga(("a", {"retry": policy}), "b", compensation_retry=policy)
    run = started(saga)
    d = run.apply(ActionFailed("a", 1, "busy", 10.0, retry_after=2.0))
    assert d.history[-1].data == {"delay": 2.0}
    assert run.state.wake_at == 12.0
    run.apply(TimerFired(12.0))
    run.apply(ActionFailed("a", 2, "busy", 13.0, retry_after=3600.0))
    assert run.state.wake_at == 17.0  # capped at max_backoff
    run.apply(TimerFired(17.0))
    run.apply(ActionFailed("a", 3, "busy", 18.0, retry_after=0.1))
    assert run.state.wake_at == 20.0  # the policy's own delay is longer: it stands
    run.apply(TimerFired(20.0))
    run.apply(ActionSucceeded("a", 4, None, 21.0))
    run.apply(ActionFailed("b", 1, "no", 22.0, retryable=False))
    d = run.apply(CompensationFailed("a", 1, "busy", 23.0, retry_after=3.0))
    assert entries(d)[-1] == ("compensation.retry_scheduled", "a", 2)
    assert run.state.wake_at == 26.0


def test_parallel_sibling_still_running_is_compensated_once_it_lands() -> None:
    # The words: the others that succeeded, and those still running once they
    # finish, are compensated; compensation across stages stays reverse.
    run = started(PARALLEL)
    succeed(run, "a", now=11.0)
    run.apply(ActionSucceeded("c", 1, "c-result", 11.5))
    d = run.apply(ActionFailed("b", 1, "rejected", 12.0, retryable=False))
    # c succeeded, but d is still in flight: nothing is undone before d lands.
    assert d.commands == []
    assert run.apply(TimerFired(50.0)).commands == []
    d = run.apply(ActionSucceeded("d", 1, "d-result", 60.0))
    assert entries(d) == [
        ("step.succeeded", "d", 1),
        ("compensation.started", "c", 1),
        ("compensation.started", "d", 1),
    ]
    assert d.commands == [InvokeCompensation("c", 1), InvokeCompensation("d", 1)]
    assert run.step("d").result == "d-result"  # its compensation gets its result
    assert run.apply(CompensationSucceeded("c", 1, 61.0)).commands == []
    # The earlier stage only after the whole group is undone.
    d = run.apply(CompensationSucceeded("d", 1, 62.0))
    assert d.commands == [InvokeCompensation("a", 1)]
    run.apply(CompensationSucceeded("a", 1, 63.0))
    assert run.status is SagaStatus.COMPENSATED
    assert "e" not in run.state.steps


def test_parallel_failure_with_a_sibling_that_fails_cleanly_skips_it() -> None:
    run = started(PARALLEL)
    succeed(run, "a", now=11.0)
    run.apply(ActionFailed("b", 1, "rejected", 12.0, retryable=False))
    run.apply(ActionSucceeded("c", 1, None, 13.0))
    d = run.apply(ActionFailed("d", 1, "busy", 14.0, retryable=True))
    assert d.commands == [InvokeCompensation("c", 1)]
    assert run.step("d").status is StepStatus.FAILED


def test_parallel_failure_cancels_waiting_retries_of_siblings() -> None:
    run = started(PARALLEL)
    succeed(run, "a", now=11.0)
    run.apply(ActionFailed("c", 1, "busy", 12.0))
    run.apply(ActionFailed("d", 1, "timed out", 12.0, maybe_applied=True))
    assert run.step("c").status is StepStatus.WAITING
    d = run.apply(ActionFailed("b", 1, "rejected", 12.5, retryable=False))
    assert d.history[3:] == [
        HistoryEntry(12.5, "step.cancelled", "c", 1),
        HistoryEntry(12.5, "step.cancelled", "d", 1, {"maybe_applied": True}),
        HistoryEntry(12.5, "compensation.started", "d", 1),
    ]
    assert d.commands == [InvokeCompensation("d", 1)]
    assert run.step("c").status is StepStatus.FAILED
    assert run.step("c").wake_at is None
    assert run.state.wake_at is None
    # The cancelled retry's timer no longer fires.
    assert run.apply(TimerFired(100.0)).commands == []


def test_compensation_of_a_parallel_stage_finishes_before_earlier_stages() -> None:
    run = started(PARALLEL)
    succeed(run, "a", "b", "c", "d")
    d = run.apply(ActionFailed("e", 1, "rejected", 30.0, retryable=False))
    assert d.commands == [
        InvokeCompensation("b", 1),
        InvokeCompensation("c", 1),
        InvokeCompensation("d", 1),
    ]
    assert run.apply(CompensationSucceeded("c", 1, 31.0)).commands == []
    run.apply(CompensationFailed("b", 1, "busy", 32.0))
    assert run.apply(CompensationSucceeded("d", 1, 33.0)).commands == []
    assert run.apply(TimerFired(33.0)).commands == [InvokeCompensation("b", 2)]
    d = run.apply(CompensationSucceeded("b", 2, 34.0))
    assert d.commands == [InvokeCompensation("a", 1)]
    run.apply(CompensationSucceeded("a", 1, 35.0))
    assert run.status is SagaStatus.COMPENSATED


def test_compensation_order_across_stages_is_reverse() -> None:
    saga = make_saga("a", "b", "c", "d", "e", "f", parallel=[("b", "c"), ("d", "e")])
    run = started(saga)
    succeed(run, "a", "b", "c", "d", "e")
    run.apply(ActionFailed("f", 1, "no", 30.0, retryable=False))
    batches: list[list[Command]] = [list(run.commands[-2:])]
    for name in ("d", "e"):
        d = run.apply(CompensationSucceeded(name, 1, 31.0))
    batches.append(d.commands)
    for name in ("b", "c"):
        d = run.apply(CompensationSucceeded(name, 1, 32.0))
    batches.append(d.commands)
    run.apply(CompensationSucceeded("a", 1, 33.0))
    assert batches == [
        [InvokeCompensation("d", 1), InvokeCompensation("e", 1)],
        [InvokeCompensation("b", 1), InvokeCompensation("c", 1)],
        [InvokeCompensation("a", 1)],
    ]
    assert run.status is SagaStatus.COMPENSATED


def test_compensation_exhausted_in_a_parallel_stage_ignores_siblings_later() -> None:
    saga = make_saga("a", "b", "c", parallel=[("a", "b")], compensation_retry=ONCE)
    run = started(saga)
    succeed(run, "a", "b")
    run.apply(ActionFailed("c", 1, "no", 30.0, retryable=False))
    d = run.apply(CompensationFailed("a", 1, "stuck", 31.0))
    assert kinds(d) == ["compensation.failed", "compensation.gave_up", "run.finished"]
    assert run.status is SagaStatus.FAILED
    d = run.apply(CompensationSucceeded("b", 1, 32.0))
    assert kinds(d) == ["event.ignored"]
    assert run.status is SagaStatus.FAILED


# == Recover (after a crash or a lost lease) ==============================================


def test_recover_of_a_pending_run_starts_it() -> None:
    run = Run(make_saga(*LINEAR))
    d = run.apply(Recover(5.0))
    assert kinds(d) == ["run.started", "step.started"]
    assert d.commands == [InvokeAction("reserve", 1)]
    assert run.status is SagaStatus.RUNNING


def test_recover_counts_the_interrupted_attempt_and_reinvokes_at_once() -> None:
    run = started(make_saga(*LINEAR))
    succeed(run, "reserve")
    d = run.apply(Recover(50.0))
    assert d.history == [
        HistoryEntry(50.0, "run.recovered"),
        HistoryEntry(50.0, "step.interrupted", "charge", 1),
        HistoryEntry(50.0, "step.retry_scheduled", "charge", 2, {"delay": 0.0}),
        HistoryEntry(50.0, "step.started", "charge", 2),
    ]
    assert d.commands == [InvokeAction("charge", 2)]
    assert run.step("charge") == StepState(
        StepStatus.RUNNING, attempts=2, maybe_applied=True, error=INTERRUPTED
    )
    # The interrupted attempt's late result is stale now.
    assert kinds(run.apply(ActionSucceeded("charge", 1, None, 51.0))) == ["event.ignored"]
    run.apply(ActionSucceeded("charge", 2, None, 52.0))
    assert run.step("charge").error is None


def test_recover_of_an_exhausted_attempt_compensates_it() -> None:
    run = started(make_saga(*LINEAR))
    succeed(run, "reserve")
    run.apply(ActionFailed("charge", 1, "e", 30.0))
    run.apply(TimerFired(31.0))
    run.apply(ActionFailed("charge", 2, "e", 32.0))
    run.apply(TimerFired(34.0))  # attempt 3 of 3 is in flight when the worker dies
    d = run.apply(Recover(50.0))
    assert entries(d) == [
        ("run.recovered", None, None),
        ("step.interrupted", "charge", 3),
        ("step.gave_up", "charge", 3),
        ("run.compensating", None, None),
        ("compensation.started", "charge", 1),
    ]
    assert d.history[2].data == {"error": INTERRUPTED, "maybe_applied": True}
    assert d.commands == [InvokeCompensation("charge", 1)]


def test_recover_of_an_interrupted_pivot_on_its_last_attempt_fails_the_run() -> None:
    run = started(make_saga("reserve", ("charge", {"pivot": True, "retry": ONCE}), "ship"))
    succeed(run, "reserve")
    d = run.apply(Recover(50.0))
    assert kinds(d) == ["run.recovered", "step.interrupted", "step.gave_up", "run.finished"]
    assert run.status is SagaStatus.FAILED
    assert d.commands == []


def test_recover_reinvokes_an_interrupted_compensation() -> None:
    run = started(make_saga(*LINEAR))
    succeed(run, "reserve")
    run.apply(ActionFailed("charge", 1, "no", 30.0, retryable=False))
    d = run.apply(Recover(50.0))
    assert d.history == [
        HistoryEntry(50.0, "run.recovered"),
        HistoryEntry(50.0, "compensation.interrupted", "reserve", 1),
        HistoryEntry(50.0, "compensation.retry_scheduled", "reserve", 2, {"delay": 0.0}),
        HistoryEntry(50.0, "compensation.started", "reserve", 2),
    ]
    assert d.commands == [InvokeCompensation("reserve", 2)]
    assert kinds(run.apply(CompensationSucceeded("reserve", 1, 51.0))) == ["event.ignored"]
    run.apply(CompensationSucceeded("reserve", 2, 52.0))
    assert run.status is SagaStatus.COMPENSATED


def test_recover_of_an_exhausted_compensation_fails_the_run() -> None:
    run = started(make_saga(*LINEAR, compensation_retry=ONCE))
    succeed(run, "reserve")
    run.apply(ActionFailed("charge", 1, "no", 30.0, retryable=False))
    d = run.apply(Recover(50.0))
    assert kinds(d) == [
        "run.recovered",
        "compensation.interrupted",
        "compensation.gave_up",
        "run.finished",
    ]
    assert d.commands == []
    assert run.status is SagaStatus.FAILED
    assert (
        run.state.error == f"compensation of step 'reserve' failed after 1 attempts: {INTERRUPTED}"
    )


def test_recover_leaves_a_retry_that_is_not_due_yet() -> None:
    run = started(make_saga(*LINEAR))
    run.apply(ActionFailed("reserve", 1, "busy", 11.0))
    d = run.apply(Recover(11.5))
    assert d.history == [HistoryEntry(11.5, "run.recovered")]
    assert d.commands == []
    assert run.step("reserve").wake_at == 12.0


def test_recover_fires_an_overdue_retry() -> None:
    run = started(make_saga(*LINEAR))
    run.apply(ActionFailed("reserve", 1, "busy", 11.0))
    d = run.apply(Recover(60.0))
    assert entries(d) == [("run.recovered", None, None), ("step.started", "reserve", 2)]
    assert d.commands == [InvokeAction("reserve", 2)]


def test_recover_fires_an_overdue_compensation_retry() -> None:
    run = started(make_saga(*LINEAR))
    succeed(run, "reserve")
    run.apply(ActionFailed("charge", 1, "no", 30.0, retryable=False))
    run.apply(CompensationFailed("reserve", 1, "busy", 31.0))
    d = run.apply(Recover(60.0))
    assert entries(d) == [("run.recovered", None, None), ("compensation.started", "reserve", 2)]
    assert d.commands == [InvokeCompensation("reserve", 2)]


def test_recover_while_compensating_with_actions_in_flight() -> None:
    run = started(PARALLEL)
    succeed(run, "a", now=11.0)
    run.apply(ActionFailed("b", 1, "rejected", 12.0, retryable=False))
    # c and d are in flight when the worker dies: both may have taken effect.
    d = run.apply(Recover(50.0))
    assert entries(d) == [
        ("run.recovered", None, None),
        ("step.interrupted", "c", 1),
        ("step.gave_up", "c", 1),
        ("step.interrupted", "d", 1),
        ("step.gave_up", "d", 1),
        ("compensation.started", "c", 1),
        ("compensation.started", "d", 1),
    ]
    assert d.commands == [InvokeCompensation("c", 1), InvokeCompensation("d", 1)]


def test_recover_in_a_parallel_stage_starts_each_compensation_once() -> None:
    saga = make_saga("a", ("b", {"retry": ONCE}), "c", "d", parallel=[("b", "c")])
    run = started(saga)
    succeed(run, "a", now=11.0)
    succeed(run, "c", now=12.0)
    d = run.apply(Recover(50.0))  # b's only attempt was in flight
    assert d.commands == [InvokeCompensation("b", 1), InvokeCompensation("c", 1)]
    assert run.step("c").compensation_attempts == 1


def test_recover_in_a_parallel_stage_does_not_fail_a_fresh_compensation() -> None:
    saga = make_saga(
        "a", ("b", {"retry": ONCE}), "c", "d", parallel=[("b", "c")], compensation_retry=ONCE
    )
    run = started(saga)
    succeed(run, "a", now=11.0)
    succeed(run, "c", now=12.0)
    run.apply(Recover(50.0))
    assert run.status is SagaStatus.COMPENSATING


def test_recover_finishes_the_run_once() -> None:
    once = RetryPolicy(max_attempts=1)
    saga = make_saga(
        ("p", {"pivot": True}),
        ("x", {"retry": once}),
        ("y", {"retry": once}),
        parallel=[("x", "y")],
    )
    run = started(saga)
    succeed(run, "p", now=11.0)
    d = run.apply(Recover(50.0))  # x and y were both on their only attempt
    assert kinds(d) == ["run.recovered", "step.interrupted", "step.gave_up", "run.finished"]
    assert run.status is SagaStatus.FAILED
    assert run.state.error is not None
    assert run.state.error.startswith("step 'x' comes after the pivot")


# == illegal events: ignored and recorded ==================================================

Setup = Callable[[], tuple[Run, Event, str]]


def _stale_action_result() -> tuple[Run, Event, str]:
    run = started(make_saga(*LINEAR))
    run.apply(ActionFailed("reserve", 1, "busy", 11.0))
    run.apply(TimerFired(12.0))
    return (
        run,
        ActionSucceeded("reserve", 1, "late", 13.0),
        ("attempt 1 is stale; the step is on attempt 2"),
    )


def _stale_action_failure() -> tuple[Run, Event, str]:
    run, _, reason = _stale_action_result()
    return run, ActionFailed("reserve", 1, "late", 13.0), reason


def _future_attempt() -> tuple[Run, Event, str]:
    run = started(make_saga(*LINEAR))
    return (
        run,
        ActionSucceeded("reserve", 2, "?", 13.0),
        ("attempt 2 is stale; the step is on attempt 1"),
    )


def _result_while_waiting() -> tuple[Run, Event, str]:
    run = started(make_saga(*LINEAR))
    run.apply(ActionFailed("reserve", 1, "busy", 11.0))
    return run, ActionSucceeded("reserve", 1, "late", 11.5), "the step is WAITING, not RUNNING"


def _duplicate_success() -> tuple[Run, Event, str]:
    run = started(make_saga(*LINEAR))
    run.apply(ActionSucceeded("reserve", 1, "r", 11.0))
    return run, ActionSucceeded("reserve", 1, "r", 11.1), "the step is SUCCEEDED, not RUNNING"


def _failure_after_success() -> tuple[Run, Event, str]:
    run, _, reason = _duplicate_success()
    return run, ActionFailed("reserve", 1, "late", 11.1), reason


def _duplicate_failure() -> tuple[Run, Event, str]:
    run = started(make_saga(*LINEAR))
    run.apply(ActionFailed("reserve", 1, "no", 11.0, retryable=False))
    run.apply(ActionFailed("charge", 1, "x", 11.0))  # finished: also ignored, keeps the state
    return (
        run,
        ActionFailed("reserve", 1, "no", 11.1, retryable=False),
        ("the run has finished (COMPENSATED)"),
    )


def _duplicate_compensation_success() -> tuple[Run, Event, str]:
    run = started(make_saga(*LINEAR))
    succeed(run, "reserve", "charge")
    run.apply(ActionFailed("ship", 1, "no", 30.0, retryable=False))
    run.apply(CompensationSucceeded("charge", 1, 31.0))
    return (
        run,
        CompensationSucceeded("charge", 1, 31.1),
        ("the step is COMPENSATED, not COMPENSATING"),
    )


def _stale_compensation_result() -> tuple[Run, Event, str]:
    run = started(make_saga(*LINEAR))
    succeed(run, "reserve")
    run.apply(ActionFailed("charge", 1, "no", 30.0, retryable=False))
    run.apply(CompensationFailed("reserve", 1, "busy", 31.0))
    run.apply(TimerFired(32.0))
    return (
        run,
        CompensationFailed("reserve", 1, "late", 33.0),
        ("attempt 1 is stale; the step is on attempt 2"),
    )


def _compensation_result_while_running() -> tuple[Run, Event, str]:
    run = started(make_saga(*LINEAR))
    succeed(run, "reserve")
    return (
        run,
        CompensationSucceeded("reserve", 1, 30.0),
        ("the step is SUCCEEDED, not COMPENSATING"),
    )


def _compensation_failure_for_a_running_action() -> tuple[Run, Event, str]:
    run = started(make_saga(*LINEAR))
    return (
        run,
        CompensationFailed("reserve", 0, "?", 30.0),
        ("the step is RUNNING, not COMPENSATING"),
    )


def _action_result_while_compensating() -> tuple[Run, Event, str]:
    run = started(make_saga(*LINEAR))
    succeed(run, "reserve")
    run.apply(ActionFailed("charge", 1, "no", 30.0, retryable=False))
    return (
        run,
        ActionSucceeded("reserve", 1, "late", 31.0),
        ("the step is COMPENSATING, not RUNNING"),
    )


def _result_for_completed_run() -> tuple[Run, Event, str]:
    run = started(make_saga(*LINEAR))
    succeed(run, *LINEAR)
    return run, ActionSucceeded("ship", 1, "again", 40.0), "the run has finished (COMPLETED)"


def _compensation_result_for_compensated_run() -> tuple[Run, Event, str]:
    run = started(make_saga(*LINEAR))
    succeed(run, "reserve")
    run.apply(ActionFailed("charge", 1, "no", 30.0, retryable=False))
    run.apply(CompensationSucceeded("reserve", 1, 31.0))
    return (
        run,
        CompensationFailed("reserve", 1, "late", 32.0),
        ("the run has finished (COMPENSATED)"),
    )


def _result_for_failed_run() -> tuple[Run, Event, str]:
    run = started(make_saga(*LINEAR, compensation_retry=ONCE))
    succeed(run, "reserve")
    run.apply(ActionFailed("charge", 1, "no", 30.0, retryable=False))
    run.apply(CompensationFailed("reserve", 1, "stuck", 31.0))
    return run, ActionSucceeded("charge", 1, "late", 32.0), "the run has finished (FAILED)"


def _unknown_step() -> tuple[Run, Event, str]:
    run = started(make_saga(*LINEAR))
    return run, ActionSucceeded("refund", 1, None, 11.0), "no such step in this saga"


def _unknown_step_compensation() -> tuple[Run, Event, str]:
    run = started(make_saga(*LINEAR))
    return run, CompensationFailed("refund", 1, "?", 11.0), "no such step in this saga"


def _second_start() -> tuple[Run, Event, str]:
    run = started(make_saga(*LINEAR))
    return run, Start(11.0), "the run has already started"


def _recover_finished_run() -> tuple[Run, Event, str]:
    run = started(make_saga(*LINEAR))
    succeed(run, *LINEAR)
    return run, Recover(40.0), "the run has finished (COMPLETED)"


ILLEGAL: dict[str, Setup] = {
    "stale action result": _stale_action_result,
    "stale action failure": _stale_action_failure,
    "result for a future attempt": _future_attempt,
    "result while the retry waits": _result_while_waiting,
    "duplicate success": _duplicate_success,
    "failure after success": _failure_after_success,
    "duplicate failure after the run finished": _duplicate_failure,
    "duplicate compensation success": _duplicate_compensation_success,
    "stale compensation result": _stale_compensation_result,
    "compensation result while running": _compensation_result_while_running,
    "compensation failure for a running action": _compensation_failure_for_a_running_action,
    "action result while compensating": _action_result_while_compensating,
    "result for a completed run": _result_for_completed_run,
    "compensation result for a compensated run": _compensation_result_for_compensated_run,
    "result for a failed run": _result_for_failed_run,
    "unknown step": _unknown_step,
    "unknown step compensation": _unknown_step_compensation,
    "second start": _second_start,
    "recover of a finished run": _recover_finished_run,
}


@pytest.mark.parametrize("setup", ILLEGAL.values(), ids=ILLEGAL.keys())
def test_illegal_event_is_ignored_and_recorded(setup: Setup) -> None:
    run, event, reason = setup()
    before = copy.deepcopy(run.state)
    d = run.apply(event)
    assert d.state == before
    assert d.state.to_json() == before.to_json()
    assert d.commands == []
    assert d.history == [
        HistoryEntry(
            event.now,
            "event.ignored",
            getattr(event, "step", None),
            getattr(event, "attempt", None),
            {"event": type(event).__name__, "reason": reason},
        ),
    ]
    assert d.changed  # recorded: the runtime persists the entry


def _result_for_a_step_not_started_yet() -> tuple[Run, Event]:
    run = started(make_saga(*LINEAR))
    return run, ActionSucceeded("ship", 1, "?", 11.0)


def _compensation_for_a_step_not_started_yet() -> tuple[Run, Event]:
    run = started(make_saga(*LINEAR))
    succeed(run, "reserve")
    run.apply(ActionFailed("charge", 1, "no", 30.0, retryable=False))
    return run, CompensationSucceeded("ship", 1, 31.0)


def _result_before_start() -> tuple[Run, Event]:
    return Run(make_saga(*LINEAR)), ActionSucceeded("reserve", 1, "?", 1.0)


@pytest.mark.parametrize(
    "setup",
    [
        _result_for_a_step_not_started_yet,
        _compensation_for_a_step_not_started_yet,
        _result_before_start,
    ],
)
def test_event_for_a_step_not_started_leaves_the_state_unchanged(
    setup: Callable[[], tuple[Run, Event]],
) -> None:
    run, event = setup()
    before = copy.deepcopy(run.state)
    d = run.apply(event)
    assert kinds(d) == ["event.ignored"]
    assert d.state == before


def test_stray_result_before_start_does_not_block_the_start() -> None:
    run = Run(make_saga(*LINEAR))
    run.apply(ActionSucceeded("reserve", 1, "?", 1.0))
    d = run.apply(Start(2.0))
    assert d.commands == [InvokeAction("reserve", 1)]
    assert run.status is SagaStatus.RUNNING


def test_timer_on_a_finished_run_does_nothing() -> None:
    run = started(make_saga(*LINEAR))
    succeed(run, *LINEAR)
    before = copy.deepcopy(run.state)
    d = run.apply(TimerFired(1000.0))
    assert (d.state, d.history, d.commands) == (before, [], [])


def test_timer_with_nothing_due_does_nothing() -> None:
    run = started(make_saga(*LINEAR))
    d = run.apply(TimerFired(1000.0))
    assert (d.history, d.commands) == ([], [])
    assert run.step("reserve").status is StepStatus.RUNNING


# == purity ===============================================================================


def _mid_run_states() -> list[tuple[RunState, Event]]:
    """Interesting (state, event) pairs: every event type against states of every status."""
    run = started(PARALLEL)
    run.apply(ActionSucceeded("a", 1, {"nested": {"list": [1, 2]}}, 11.0))
    run.apply(ActionFailed("c", 1, "busy", 12.0, maybe_applied=True))
    running = copy.deepcopy(run.state)
    run.apply(ActionFailed("b", 1, "no", 13.0, retryable=False))
    compensating = copy.deepcopy(run.state)
    events: list[Event] = [
        Start(20.0),
        TimerFired(20.0),
        Recover(20.0),
        ActionSucceeded("b", 1, {"r": [1]}, 20.0),
        ActionSucceeded("d", 1, {"r": [2]}, 20.0),
        ActionFailed("d", 1, "x", 20.0, maybe_applied=True),
        CompensationSucceeded("a", 1, 20.0),
        CompensationFailed("c", 1, "y", 20.0),
    ]
    return [(state, event) for state in (RunState(), running, compensating) for event in events]


@pytest.mark.parametrize(("state", "event"), _mid_run_states())
def test_decide_does_not_mutate_its_input(state: RunState, event: Event) -> None:
    snapshot = copy.deepcopy(state)
    as_json = json.dumps(state.to_json(), sort_keys=True)
    decision = decide(PARALLEL, RUN_ID, state, event)
    assert state == snapshot
    assert json.dumps(state.to_json(), sort_keys=True) == as_json
    assert decision.state is not state
    for name, step in decision.state.steps.items():
        assert step is not state.steps.get(name)


@pytest.mark.parametrize(("state", "event"), _mid_run_states())
def test_identical_inputs_give_identical_outputs(state: RunState, event: Event) -> None:
    first = decide(PARALLEL, RUN_ID, copy.deepcopy(state), event)
    second = decide(PARALLEL, RUN_ID, copy.deepcopy(state), event)
    again = decide(
        PARALLEL, RUN_ID, RunState.from_json(json.loads(json.dumps(state.to_json()))), event
    )
    assert first == second == again
    assert [h.to_json() for h in first.history] == [h.to_json() for h in second.history]


# == explorer: seeded random runs keep every promise ======================================


def _outcome(rng: random.Random, cmd: Command, now: float) -> Event:
    roll = rng.random()
    if isinstance(cmd, InvokeAction):
        if roll < 0.6:
            return ActionSucceeded(cmd.step, cmd.attempt, {"step": cmd.step}, now)
        if roll < 0.8:
            return ActionFailed(cmd.step, cmd.attempt, "transient", now)
        if roll < 0.92:
            return ActionFailed(cmd.step, cmd.attempt, "timed out", now, maybe_applied=True)
        return ActionFailed(cmd.step, cmd.attempt, "business no", now, retryable=False)
    if roll < 0.75:
        return CompensationSucceeded(cmd.step, cmd.attempt, now)
    if roll < 0.97:
        return CompensationFailed(cmd.step, cmd.attempt, "transient", now)
    return CompensationFailed(cmd.step, cmd.attempt, "cannot undo", now, retryable=False)


def explore(saga: Saga, seed: int, *, crash_rate: float = 0.05) -> tuple[Run, list[Decision]]:
    """Drive a run to its end, answering commands in random order, with crashes and noise."""
    rng = random.Random(seed)
    run = Run(saga, f"run-{seed}")
    now = 0.0
    decisions = [run.apply(Start(now))]
    in_flight = list(decisions[0].commands)
    lost: list[Event] = []
    for _ in range(5000):
        if run.status.finished:
            break
        now += 1.0
        if rng.random() < crash_rate:
            # Everything in flight is cut; its results may still arrive, late.
            lost += [_outcome(rng, c, now) for c in in_flight]
            in_flight.clear()
            d = run.apply(Recover(now))
        elif in_flight:
            event = _outcome(rng, in_flight.pop(rng.randrange(len(in_flight))), now)
            d = run.apply(event)
            if rng.random() < 0.1:  # the transport delivers it twice
                dup = run.apply(event)
                assert kinds(dup) == ["event.ignored"], dup.history
        elif lost and (rng.random() < 0.5 or run.state.wake_at is None):
            late = lost.pop()
            d = run.apply(late)
            assert kinds(d) == ["event.ignored"], d.history
        else:
            wake = run.state.wake_at
            assert wake is not None, f"stuck: nothing in flight and no timer ({run.state})"
            now = max(now, wake)
            d = run.apply(TimerFired(now))
            assert d.commands, "a due timer must start something"
        decisions.append(d)
        in_flight += d.commands
    return run, decisions


SHAPES = {
    "linear": make_saga("a", "b", "c"),
    "pivot": make_saga(
        "a",
        ("r", {"read_only": True}),
        ("p", {"pivot": True}),
        ("x", {"retry": RetryPolicy(max_attempts=4, jitter=0.0)}),
        "y",
    ),
    "parallel": make_saga("a", "b", "c", "d", "e", parallel=[("b", "c", "d")]),
    "parallel-after-pivot": make_saga(
        "a", "b", ("p", {"pivot": True}), "x", "y", parallel=[("a", "b"), ("x", "y")]
    ),
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", range(40))
def test_explored_runs_always_end_and_keep_the_promises(shape: str, seed: int) -> None:
    saga = SHAPES[shape]
    run, _ = explore(saga, seed)
    state = run.state
    assert state.status.finished
    # Duplicates and late results may still arrive after the end; they are only recorded.
    applied = [h for h in run.history if h.kind != "event.ignored"]
    assert applied[-1].kind == "run.finished"
    assert applied[-1].data is not None
    assert applied[-1].data["status"] == state.status.value
    assert kinds(applied).count("run.finished") == 1
    assert state.wake_at is None

    actions = Counter(c.step for c in run.commands if isinstance(c, InvokeAction))
    for step in saga:
        s = state.steps.get(step.name)
        assert actions[step.name] == (s.attempts if s else 0)
        limit = step.retry.max_attempts
        if limit is not None:
            assert actions[step.name] <= limit
        if step.kind is not StepKind.COMPENSATABLE or step.compensation_fn is None:
            assert s is None or s.compensation_attempts == 0, step.name

    if state.status is SagaStatus.COMPLETED:
        assert state.error is None
        assert {n: s.status for n, s in state.steps.items()} == {
            s.name: StepStatus.SUCCEEDED for s in saga
        }
    elif state.status is SagaStatus.COMPENSATED:
        assert state.error is not None
        for step in saga:
            s = state.steps.get(step.name)
            if s is None:
                continue
            assert s.status not in (
                StepStatus.RUNNING,
                StepStatus.WAITING,
                StepStatus.COMPENSATING,
                StepStatus.COMPENSATION_WAITING,
            )
            if step.kind is StepKind.COMPENSATABLE and step.compensation_fn and s.maybe_applied:
                assert s.status is StepStatus.COMPENSATED, step.name
            if step.kind is not StepKind.COMPENSATABLE:
                assert s.status is not StepStatus.SUCCEEDED, step.name
    else:
        assert state.error is not None


@pytest.mark.parametrize("shape", ["linear", "pivot"])
@pytest.mark.parametrize("seed", range(40))
def test_explored_decisions_never_invoke_the_same_thing_twice(shape: str, seed: int) -> None:
    _, decisions = explore(SHAPES[shape], seed, crash_rate=0.15)
    for d in decisions:
        targets = [(type(c).__name__, c.step) for c in d.commands]
        assert len(targets) == len(set(targets)), d.history


FINITE = RetryPolicy(max_attempts=3, initial_backoff=1.0, jitter=0.0)
PARALLEL_SHAPES = {
    "parallel": SHAPES["parallel"],
    "parallel-after-pivot": SHAPES["parallel-after-pivot"],
    "parallel-after-pivot-finite": make_saga(
        "a",
        ("p", {"pivot": True}),
        ("x", {"retry": FINITE}),
        ("y", {"retry": FINITE}),
        parallel=[("x", "y")],
    ),
}


@pytest.mark.parametrize("shape", PARALLEL_SHAPES)
def test_explored_parallel_runs_under_crashes(shape: str) -> None:
    for seed in range(200):
        run, decisions = explore(PARALLEL_SHAPES[shape], seed, crash_rate=0.15)
        assert kinds(run.history).count("run.finished") == 1, (shape, seed)
        for d in decisions:
            targets = [(type(c).__name__, c.step) for c in d.commands]
            assert len(targets) == len(set(targets)), (shape, seed, d.history)


def test_explorer_reaches_every_terminal_status() -> None:
    statuses = {explore(SHAPES[shape], seed)[0].status for shape in SHAPES for seed in range(40)}
    assert statuses == {SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED}
