"""The invariants every harness run is checked against (sagaway's promises, from the ledger).

Each check reads what the participants saw (the harness's :class:`~sagaway.testing.faults.Call`
ledger), not what the orchestrator believes, so a wrong belief shows up as a violation:

* the run **ends**, COMPLETED or COMPENSATED — or FAILED only when a compensation was made to
  fail;
* in a COMPENSATED run, **every step that may have taken effect is compensated**, and
  compensations run **in reverse order** of the steps' stages;
* a COMPLETED run ran no compensation;
* **idempotency keys are stable**: every invocation of one step's action (or compensation),
  in every process, carried the same key, ``{run_id}:{step}:{action|compensation}``;
* **no action runs after compensation began**.
"""

from __future__ import annotations

from sagaway.definition.saga import Saga
from sagaway.run import SagaStatus
from sagaway.testing.faults import Call
from sagaway.testing.harness import Outcome

__all__ = ["pivot_unknown", "violations"]


def violations(saga: Saga, outcome: Outcome) -> list[str]:
    """What is wrong with one run, in words (empty: every invariant held)."""
    found: list[str] = []
    faults = outcome.schedule.faults
    status = outcome.status
    if outcome.run is None:
        return ["the run never started"]
    if not outcome.ended or status is None or not status.finished:
        found.append(f"the run did not end: still {status.value if status else '?'} after "
                     f"{outcome.virtual_seconds:.0f} virtual seconds")
        return found
    # FAILED is right when a compensation was made to fail, or when the pivot's outcome is
    # unknown (after the point of no return sagaway does not guess; an operator decides).
    made_to_fail = any(f.compensation for f in faults)
    if status is SagaStatus.FAILED and not made_to_fail and not pivot_unknown(outcome):
        found.append(f"the run ended FAILED although no compensation was made to fail: "
                     f"{outcome.run.error}")
    elif status not in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED):
        found.append(f"the run ended {status.value}")
    calls = [c for c in outcome.calls if c.run_id == outcome.run.id]
    found += _keys(calls, outcome.run.id)
    found += _no_action_after_compensation(calls)
    if status is SagaStatus.COMPENSATED:
        found += _compensated(saga, calls)
        # The fakes' own records: an effect still standing in a compensated run.
        found += [f"{step}: its fake participant still holds the effect in a COMPENSATED run"
                  for step, state in sorted(outcome.fakes.items()) if state == "applied"
                  and saga[step].compensation_fn is not None]
    if status is SagaStatus.COMPLETED:
        undone = sorted({c.step for c in calls if c.compensating})
        if undone:
            found.append(f"the run COMPLETED but compensated {', '.join(undone)}")
        found += [f"{step}: its fake participant is {state} in a COMPLETED run"
                  for step, state in sorted(outcome.fakes.items())
                  if state != "applied" and not saga[step].read_only]
    found += [msg for _step, msg in outcome.notes]
    return found


def pivot_unknown(outcome: Outcome) -> bool:
    """The run ended FAILED because the pivot's outcome is unknown (it timed out, went
    silent after its effect, or a crash cut it).

    That is sagaway's documented rule (after the point of no return it neither finishes nor
    compensates on a guess; an operator decides), so it is an allowed end, counted apart.
    """
    error = outcome.run.error if outcome.run is not None else None
    return (outcome.status is SagaStatus.FAILED and error is not None
            and "gave up with an unknown outcome" in error)


def _keys(calls: list[Call], run_id: str) -> list[str]:
    out = []
    seen: dict[tuple[str, bool], set[str]] = {}
    for c in calls:
        seen.setdefault((c.step, c.compensating), set()).add(c.key)
    for (step, compensating), keys in sorted(seen.items()):
        want = f"{run_id}:{step}:{'compensation' if compensating else 'action'}"
        if keys != {want}:
            what = "compensation" if compensating else "action"
            out.append(f"idempotency key of {step} {what} not stable: saw {sorted(keys)}, "
                       f"expected {want!r}")
    return out


def _no_action_after_compensation(calls: list[Call]) -> list[str]:
    first = next((c for c in calls if c.compensating), None)
    if first is None:
        return []
    late = [c for c in calls if not c.compensating and c.seq > first.seq]
    return [f"action of {c.step} ran after compensation began ({first.describe()} came "
            f"first; then {c.describe()})" for c in late]


def _compensated(saga: Saga, calls: list[Call]) -> list[str]:
    out = []
    undone = {c.step: c for c in calls if c.compensating and c.effect}
    for step in saga.steps:
        took = [c for c in calls if c.step == step.name and not c.compensating and c.effect]
        if not took or step.read_only:
            continue
        if step.name not in undone:
            out.append(f"{step.name} may have taken effect ({took[-1].describe()}) but was "
                       f"never compensated")
    # Reverse order: a step's compensation starts only after every later stage's
    # compensation has applied.
    stage_of = {s.name: i for i, stage in enumerate(saga.stages) for s in stage}
    for c in calls:
        if not c.compensating:
            continue
        for later, done in undone.items():
            if stage_of[later] <= stage_of[c.step]:
                continue
            if not any(d.compensating and d.step == later and d.effect and d.seq < c.seq
                       for d in calls):
                out.append(f"compensation of {c.step} ran before {later} (a later step) was "
                           f"compensated: {c.describe()} before {done.describe()}")
    return sorted(set(out), key=out.index)
