"""Run state: the JSON document the store keeps, and the views derived from it."""

from __future__ import annotations

import json

from sagaway import HistoryEntry, SagaStatus
from sagaway.engine.state import RunState, StepState, StepStatus


def test_default_step_state_serialises_minimally() -> None:
    assert StepState().to_json() == {"status": "PENDING", "attempts": 0}
    assert StepState.from_json({"status": "PENDING"}) == StepState()


def test_full_run_state_round_trips_through_json() -> None:
    state = RunState(
        status=SagaStatus.COMPENSATING,
        stage=2,
        steps={
            "a": StepState(
                StepStatus.COMPENSATION_WAITING,
                attempts=2,
                maybe_applied=True,
                result={"id": [1, "x"]},
                error="busy",
                compensation_attempts=3,
                wake_at=12.5,
                succeeded=True,
            ),
            "b": StepState(StepStatus.FAILED, attempts=1, error="no"),
        },
        error="step 'b' failed: no",
    )
    as_json = state.to_json()
    assert as_json == {
        "status": "COMPENSATING",
        "stage": 2,
        "steps": {
            "a": {
                "status": "COMPENSATION_WAITING",
                "attempts": 2,
                "maybe_applied": True,
                "result": {"id": [1, "x"]},
                "error": "busy",
                "compensation_attempts": 3,
                "wake_at": 12.5,
                "succeeded": True,
            },
            "b": {"status": "FAILED", "attempts": 1, "error": "no"},
        },
        "error": "step 'b' failed: no",
    }
    assert RunState.from_json(json.loads(json.dumps(as_json))) == state


def test_new_run_state() -> None:
    state = RunState()
    assert state.to_json() == {"status": "PENDING", "stage": 0, "steps": {}}
    assert RunState.from_json({"status": "PENDING"}) == state
    assert state.wake_at is None
    assert state.results == {}


def test_wake_at_is_the_earliest_step_timer() -> None:
    state = RunState(
        steps={
            "a": StepState(StepStatus.WAITING, attempts=1, wake_at=30.0),
            "b": StepState(StepStatus.COMPENSATION_WAITING, wake_at=20.0),
            "c": StepState(StepStatus.RUNNING, attempts=1),
        }
    )
    assert state.wake_at == 20.0


def test_results_hold_only_steps_whose_action_succeeded() -> None:
    state = RunState(
        steps={
            "ok": StepState(StepStatus.SUCCEEDED, attempts=1, result={"x": 1}, succeeded=True),
            "none": StepState(StepStatus.SUCCEEDED, attempts=1, result=None, succeeded=True),
            "undone": StepState(
                StepStatus.COMPENSATED,
                attempts=1,
                result=7,
                succeeded=True,
                compensation_attempts=1,
            ),
            "undoing": StepState(
                StepStatus.COMPENSATION_WAITING,
                attempts=1,
                result=8,
                error="compensation failed",
                succeeded=True,
            ),
            "timed_out": StepState(StepStatus.COMPENSATED, attempts=3, maybe_applied=True),
            "failed": StepState(StepStatus.FAILED, attempts=1, error="no"),
            "running": StepState(StepStatus.RUNNING, attempts=1),
        }
    )
    assert state.results == {"ok": {"x": 1}, "none": None, "undone": 7, "undoing": 8}


def test_clone_is_independent() -> None:
    state = RunState(SagaStatus.RUNNING, 1, {"a": StepState(StepStatus.RUNNING, attempts=1)})
    copy = state.clone()
    assert copy == state
    copy.steps["a"].attempts = 2
    copy.steps["b"] = StepState()
    copy.status = SagaStatus.FAILED
    assert state == RunState(
        SagaStatus.RUNNING, 1, {"a": StepState(StepStatus.RUNNING, attempts=1)}
    )


def test_finished_statuses() -> None:
    assert {s for s in SagaStatus if s.finished} == {
        SagaStatus.COMPLETED,
        SagaStatus.COMPENSATED,
        SagaStatus.FAILED,
        SagaStatus.RESOLVED,
    }


def test_history_entry_round_trips_and_omits_empty_fields() -> None:
    bare = HistoryEntry(1.5, "run.recovered")
    assert bare.to_json() == {"at": 1.5, "kind": "run.recovered"}
    assert HistoryEntry.from_json(bare.to_json()) == bare
    full = HistoryEntry(2.0, "step.failed", "charge", 3, {"error": "x"})
    assert full.to_json() == {
        "at": 2.0,
        "kind": "step.failed",
        "step": "charge",
        "attempt": 3,
        "data": {"error": "x"},
    }
    assert HistoryEntry.from_json(full.to_json()) == full
